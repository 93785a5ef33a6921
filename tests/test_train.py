"""Training: the loss goes down, resuming is exact, the data plan is a clean split, CLI errors are one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bdm_train import checkpoint
from bdm_train.batches import batch_indices
from bdm_train.train import main, train
from bdm_train.sample_cli import main as sample_main
from conftest import ROOT

SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(4,), blur_sigma_max=2.0, batch_size=8, lr=1e-3,
             warmup=2, log_every=1, ckpt_every=0)


def _log(ckpt_path):
    with open(os.path.join(os.path.dirname(ckpt_path), "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_goes_down(tiny_checkpoint, tiny_data):
    log = _log(tiny_checkpoint)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    # Independent reference: a fresh UNet outputs exactly 0, so its loss is E||eps||^2 = 1. The
    # trained EMA model must do clearly better on a fresh draw of (t, eps).
    model, process, _ = checkpoint.load(tiny_checkpoint)
    x = torch.from_numpy(np.load(tiny_data)["images"][:64]).float() / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    t, eps = torch.rand(64, generator=g), torch.randn(x.shape, generator=g)
    with torch.no_grad():
        loss = torch.mean((eps - model(process.q_sample(x, t, eps), t)) ** 2).item()
    assert loss < 0.7, loss
    assert os.path.isfile(os.path.join(os.path.dirname(tiny_checkpoint), "samples_000030.png"))


def test_checkpoint_config(tiny_checkpoint, tiny_cond_checkpoint):
    _, _, cfg = checkpoint.load(tiny_checkpoint)
    assert cfg["sampler"] == {"clip_denoised": True, "steps": 50, "eta": 0.0}
    assert cfg["model"]["num_classes"] == 0 and cfg["model"]["image_size"] == 16
    assert cfg["process"]["blur_sigma_max"] == 3.0 and cfg["data"]["channels"] == 1
    model, _, cfg = checkpoint.load(tiny_cond_checkpoint)
    assert model.num_classes == 3 and cfg["train"]["num_classes"] == 3
    assert checkpoint.load_state(tiny_cond_checkpoint)["step"] == 30


def test_batch_plan_is_epoch_permutations_split_by_rank():
    n, B = 10, 4
    stream = torch.cat([batch_indices(0, k, n, B) for k in range(5)])  # 20 draws = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new order each epoch
    assert torch.equal(batch_indices(0, 3, n, B), stream[12:16])  # stateless: step 3 alone is the same


def test_resume_matches_uninterrupted(tmp_path, small_data):
    """3 steps, then resume to 6, equals 6 straight (dropout on: the RNG handling is exercised)."""
    opts = dict(SMALL, dropout=0.1, num_classes=3, flip=True, seed=5)
    straight = train(small_data, tmp_path / "a", progress=False, steps=6, **opts)
    train(small_data, tmp_path / "b", progress=False, steps=3, **opts)
    assert checkpoint.load_state(tmp_path / "b" / "model.pt")["step"] == 3
    resumed = train(None, tmp_path / "b", resume=True, progress=False, steps=6)  # options from the checkpoint
    a, b = checkpoint.load_state(straight), checkpoint.load_state(resumed)
    assert b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _log(resumed)] == [r["loss"] for r in _log(straight)]


def test_resume_refuses_architecture_change(tmp_path, small_data):
    train(small_data, tmp_path, progress=False, steps=1, **SMALL)
    with pytest.raises(Exception, match="--ch 16 differs"):
        train(small_data, tmp_path, resume=True, progress=False, steps=2, ch=16)


def test_release_keeps_ema_and_sampler_defaults_and_refuses_resume(tmp_path, tiny_checkpoint):
    """The shipped-model format: EMA weights only, smaller, new sampler defaults, not resumable."""
    dst = tmp_path / "rel" / "model.pt"
    checkpoint.release(tiny_checkpoint, dst, sampler=dict(steps=20, eta=1.0))
    full, rel = checkpoint.load_state(tiny_checkpoint), checkpoint.load_state(dst)
    assert rel["config"]["sampler"] == dict(full["config"]["sampler"], steps=20, eta=1.0)
    assert rel["step"] == full["step"] and rel["optimizer"] is None
    for name, value in full["ema"].items():
        assert torch.equal(rel["ema"][name], value) and torch.equal(rel["model"][name], value), name
    assert any(not torch.equal(full["model"][k], full["ema"][k]) for k in full["ema"])  # EMA != raw weights
    assert os.path.getsize(dst) < 0.5 * os.path.getsize(tiny_checkpoint)  # one copy of weights, no Adam moments
    model, _, _ = checkpoint.load(dst, ema=False)  # even --no-ema gets the EMA weights
    assert all(torch.equal(p, full["ema"][k]) for k, p in model.state_dict().items())
    with pytest.raises(Exception, match="release checkpoint"):
        train(None, dst.parent, resume=True, progress=False, steps=40)


# -- the CLI boundary: one line, non-zero exit --------------------------------------------------
def _cli_error(entry, args, capsys):
    with pytest.raises(SystemExit) as e:
        entry(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code not in (0, None)
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_errors(tmp_path, small_data, capsys):
    out = str(tmp_path / "run")
    err = _cli_error(main, ["--data", str(tmp_path / "missing"), "--out", out, "--quiet"], capsys)
    assert "missing" in err
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"garbage")
    assert "x.png" in _cli_error(main, ["--data", str(tmp_path / "imgs"), "--out", out, "--quiet"], capsys)
    err = _cli_error(main, ["--data", small_data, "--out", out, "--image-size", "16", "--quiet"], capsys)
    assert "--fit pad|resize" in err
    assert "--ch-mult" in _cli_error(main, ["--data", small_data, "--out", out, "--ch-mult", "1,x"], capsys)
    _cli_error(main, ["--data", small_data, "--out", out, "--fit", "stretch"], capsys)  # click usage error
    err = _cli_error(main, ["--data", small_data, "--out", out, "--num-classes", "2", "--quiet"], capsys)
    assert "labels" in err  # labels 0..2 do not fit 2 classes
    # Option ranges and devices are refused before any data is read or a process group is started.
    for args, flag in ((["--log-every", "0"], "--log-every"), (["--sample-n", "0"], "--sample-n"),
                       (["--workers", "-1"], "--workers"), (["--device", "bogus"], "bogus"),
                       (["--device", "cuda:abc"], "cuda:abc"), (["--device", "cuda:99"], "cuda")):
        assert flag in _cli_error(main, ["--data", small_data, "--out", out, "--quiet"] + args, capsys), args
    assert not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.pt"), "wb") as f:
        f.write(os.urandom(1000))
    assert "model.pt" in _cli_error(main, ["--out", out, "--resume", "--quiet"], capsys)
    assert "model.pt" in _cli_error(sample_main, ["--ckpt", os.path.join(out, "model.pt")], capsys)


def test_cli_subprocess_error_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bdm_train.train", "--data", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("Error: ") and "nope" in r.stderr


def test_sample_cli(tiny_cond_checkpoint, tmp_path):
    """Grid and npz written; images depend only on (seed, index): two half calls equal one call."""
    common = ["--ckpt", tiny_cond_checkpoint, "--steps", "3", "--eta", "1", "--seed", "7", "--quiet",
              "--label", "1", "--guidance", "1.5"]
    for name, extra in (("all", ["--n", "4"]), ("lo", ["--n", "2"]), ("hi", ["--n", "2", "--first-index", "2"])):
        sample_main(common + extra + ["--out", str(tmp_path / f"{name}.png"), "--npz", str(tmp_path / f"{name}.npz")])
    full, lo, hi = (np.load(tmp_path / f"{n}.npz") for n in ("all", "lo", "hi"))
    assert full["images"].shape == (4, 16, 16, 1) and full["samples"].shape == (4, 1, 16, 16)
    assert full["labels"].tolist() == [1, 1, 1, 1]
    # Measured max difference: 0.0 (1 and 2 threads). Only float32 summation order may differ between
    # batch sizes (~1e-7 per value); 1e-6 allows that, while a wrong noise index moves pixels by O(1).
    np.testing.assert_allclose(np.concatenate([lo["samples"], hi["samples"]]), full["samples"], atol=1e-6)
    assert os.path.getsize(tmp_path / "all.png") > 0


def test_sample_cli_errors_before_sampling(tiny_checkpoint, tmp_path, capsys):
    """Unwritable outputs and unknown devices: one line, nothing written, no traceback."""
    base = ["--ckpt", tiny_checkpoint, "--n", "2", "--steps", "2", "--quiet"]
    missing = str(tmp_path / "no" / "grid.png")
    assert "does not exist" in _cli_error(sample_main, base + ["--out", missing], capsys)
    err = _cli_error(sample_main, base + ["--out", str(tmp_path / "g.png"),
                                          "--npz", str(tmp_path / "no" / "s.npz")], capsys)
    assert "--npz" in err
    for device in ("gpu", "cuda:9", "cuda:abc"):
        assert device in _cli_error(sample_main, base + ["--out", str(tmp_path / "g.png"), "--device", device],
                                    capsys)
    assert os.listdir(tmp_path) == []


def test_sample_cli_solver_and_grid(tiny_checkpoint, tmp_path, capsys):
    """--solver/--grid/--eta reach bdm_train.sampling.sample (dpmpp2m deterministic, and at --eta 1, B16)."""
    from bdm_train.sampling import sample

    npz = tmp_path / "s.npz"
    sample_main(["--ckpt", tiny_checkpoint, "--n", "3", "--steps", "4", "--solver", "dpmpp2m", "--grid", "spectral",
                 "--seed", "2", "--quiet", "--out", str(tmp_path / "g.png"), "--npz", str(npz)])
    model, process, config = checkpoint.load(tiny_checkpoint)
    want = sample(model, process, 3, seed=2, steps=4, solver="dpmpp2m", grid="spectral",
                  clip_denoised=config["sampler"]["clip_denoised"]).numpy()
    np.testing.assert_array_equal(np.load(npz)["samples"], want)   # same code, same process: bit-equal
    sample_main(["--ckpt", tiny_checkpoint, "--n", "3", "--steps", "4", "--solver", "dpmpp2m", "--grid", "edm",
                 "--eta", "1", "--seed", "2", "--quiet", "--out", str(tmp_path / "h.png"),
                 "--npz", str(tmp_path / "h.npz")])
    sde = sample(model, process, 3, seed=2, steps=4, solver="dpmpp2m", grid="edm", eta=1.0,
                 clip_denoised=config["sampler"]["clip_denoised"]).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "h.npz")["samples"], sde)
    assert np.abs(sde - want).max() > 1e-3
