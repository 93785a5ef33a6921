"""bdm-export: what it writes and prints, its one-line errors, --check, and the torch-free engine path."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from bdm_train import checkpoint
from bdm_export import export_onnx, read_metadata
from bdm_export.check import check_onnx
from bdm_export.cli import main
from bdm_export.fp16 import value_types
from bdm_runtime.trt_build import parse_batch, unavailable_reason
from bdm_runtime import onnx_meta
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from helpers import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TRT = unavailable_reason()


def run_cli(args, capsys):
    """``(exit status, stdout, stderr)`` of ``bdm-export args`` in this process."""
    return in_process(main, args, capsys)


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def uncond_graph(tiny_checkpoint, tmp_path_factory):
    model, process, _ = checkpoint.load(tiny_checkpoint)
    path = tmp_path_factory.mktemp("cli_graph") / "bdm.onnx"
    export_onnx(model, process, path, channels=1, default_steps=10)
    return model, process, path


def test_export_fp16_check(tiny_cond_checkpoint, tmp_path, capsys):
    """--fp16 --check on a conditional checkpoint: both graphs, overrides in metadata, check passes."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(["--ckpt", tiny_cond_checkpoint, "--out-dir", out, "--fp16", "--check",
                                 "--steps", 7, "--eta", 0.3], capsys)
    print(stdout)
    assert code == 0, err
    for name, precision in (("bdm.onnx", "fp32"), ("bdm_fp16.onnx", "fp16")):
        meta = read_metadata(out / name)
        assert (meta[fmt.K_PRECISION], meta[fmt.K_DEFAULT_STEPS], meta[fmt.K_DEFAULT_ETA]) == (precision, 7, 0.3)
        assert (meta[fmt.K_NUM_CLASSES], meta[fmt.K_GUIDANCE]) == (3, True)
        assert f"wrote {out / name} ({precision}, 1x16x16, 3 classes, guided" in stdout
    if NO_TRT:
        assert f"no TensorRT engine built: {NO_TRT}" in stdout
        assert sorted(os.listdir(out)) == ["bdm.onnx", "bdm_fp16.onnx"]
    assert "onnxrt vs torch [fp16] z_next" in stdout and "max abs" in stdout
    assert stdout.rstrip().endswith("check passed")


def test_defaults_from_checkpoint(tiny_cond_checkpoint, tmp_path, capsys):
    """Default out-dir is the checkpoint's folder; sampler defaults from its config; --no-guidance."""
    ckpt = tmp_path / "model.pt"
    shutil.copy(tiny_cond_checkpoint, ckpt)
    sampler = checkpoint.load(ckpt)[2]["sampler"]
    code, stdout, err = run_cli(["--ckpt", ckpt, "--no-guidance", "--no-engine"], capsys)
    assert code == 0, err
    meta = read_metadata(tmp_path / "bdm.onnx")
    assert meta[fmt.K_DEFAULT_STEPS] == sampler["steps"]
    assert meta[fmt.K_DEFAULT_ETA] == sampler["eta"]
    assert meta[fmt.K_CLIP_DENOISED] == sampler["clip_denoised"]
    assert meta[fmt.K_GUIDANCE] is False
    assert (meta[fmt.K_DEFAULT_SOLVER], meta[fmt.K_DEFAULT_GRID]) == ("ddim", "uniform")  # config has neither
    names = [i.name for i in onnx.load(str(tmp_path / "bdm.onnx")).graph.input]
    assert names == fmt.inputs(2, num_classes=3)
    assert "no TensorRT engine built: --no-engine" in stdout
    assert not (tmp_path / "bdm_fp16.onnx").exists()


def test_cli_errors(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(*run_cli(["--ckpt", bad, "--out-dir", out], capsys)[::2], "bad.pt")
    assert_one_line_error(*run_cli(["--ckpt", tmp_path / "missing.pt", "--out-dir", out], capsys)[::2],
                          "does not exist")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", blocker], capsys)[::2], "is a file")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", blocker / "sub"], capsys)[::2],
                          "--out-dir")
    for spec in ("4:2:1", "16", "a:b:c", "0:1:2"):
        assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", out, "--batch", spec],
                                       capsys)[::2], "batch profile")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", out, "--guidance"], capsys)[::2],
                          "unconditional")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", out, "--eta", 1.5], capsys)[::2],
                          "--eta")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--out-dir", out, "--grid", "cosine"], capsys)[::2],
                          "--grid")
    assert_one_line_error(*run_cli([], capsys)[::2], "--ckpt")
    assert_one_line_error(*run_cli(["--onnx", tmp_path / "x.onnx"], capsys)[::2], "--out")
    assert_one_line_error(*run_cli(["--onnx", tmp_path / "x.onnx", "--out", tmp_path / "x.plan", "--check"],
                                   capsys)[::2], "--ckpt")
    assert_one_line_error(*run_cli(["--ckpt", tiny_checkpoint, "--bogus"], capsys)[::2], "--bogus")
    assert sorted(os.listdir(out)) == []          # nothing written by any of them
    assert sorted(os.listdir(tmp_path)) == ["a_file", "bad.pt", "out"]


def test_help_states_tolerances(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "fp32: 0.0001 abs / 0.0001 rel" in " ".join(out.split())
    assert "MIN:OPT:MAX" in out and "--timing-cache" in out and "--workspace" in out


def test_check_detects_a_wrong_graph(uncond_graph):
    """--check can fail: the graph against a model with perturbed weights."""
    model, process, path = uncond_graph
    lines = []
    assert check_onnx(path, model, process, log=lines.append, iterations=1)
    other = checkpoint.build({"model": model.config(), "process": process.config()})[0].eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.conv_out.bias.add_(0.05)
    lines = []
    assert not check_onnx(path, other, process, log=lines.append, iterations=1)
    assert any("FAILED" in line for line in lines)


# -- the engine path: torch-free, Python 3.8 ------------------------------------------------------
def _python(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=e)


def test_engine_path_never_imports_torch(uncond_graph, tmp_path):
    """``bdm-export --onnx X --out Y`` with torch (and onnx) made unimportable."""
    _, _, path = uncond_graph
    plan = tmp_path / "bdm.plan"
    block = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
    r = _python(block + f"from bdm_export.cli import main; main(['--onnx', {str(path)!r}, '--out', {str(plan)!r}, "
                        "'--batch', '1:2:4'])")
    if NO_TRT:
        assert r.returncode == 1
        assert r.stderr.strip() == f"Error: cannot build a TensorRT engine: {NO_TRT}"
        assert not os.listdir(tmp_path)
    else:
        assert r.returncode == 0, r.stderr
        side = json.loads((tmp_path / "bdm.plan.json").read_text())
        assert side[fmt.K_PROFILE] == {"min": 1, "opt": 2, "max": 4}
    r = _python(block + "import bdm_export, bdm_runtime.trt_build\nfrom bdm_runtime.trt_build import build_engine\nimport bdm_export.cli\n"
                        "assert sys.modules['torch'] is None and sys.modules['onnx'] is None\n"
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))")
    assert r.returncode == 0 and r.stdout.strip() == "['onnx', 'torch']", r.stderr
    r = _python(block + f"from bdm_export.cli import main; main(['--onnx', {str(tmp_path / 'no.onnx')!r}, "
                        f"'--out', {str(plan)!r}])")
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: ") and "no.onnx" in r.stderr


def test_engine_path_refuses_foreign_onnx(tmp_path, capsys):
    """An .onnx without bdm metadata is refused before TensorRT is touched."""
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g), str(tmp_path / "relu.onnx"))
    assert_one_line_error(*run_cli(["--onnx", tmp_path / "relu.onnx", "--out", tmp_path / "x.plan"], capsys)[::2],
                          "not a bdm step graph")


def test_python38_compatible():
    """The files a Jetson (JetPack 5, Python 3.8) runs: the engine builder and the CLI."""
    files = [os.path.join(ROOT, "runtime", "trt_build.py")] + [os.path.join(ROOT, "export", f) for f in ("__init__.py", "cli.py")]
    pytest.importorskip("vermin")
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "-t=3.8-", "--no-tips",
              "--violations", "--eval-annotations"]
    r = subprocess.run(vermin + files, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_onnx_value_types_without_onnx(tiny_checkpoint, tmp_path):
    """The protobuf walker TensorRT 8 builds use to pin precisions agrees with onnx's shape inference."""
    model, process, _ = checkpoint.load(tiny_checkpoint)
    path = tmp_path / "fp16.onnx"
    export_onnx(model, process, path, channels=1, fp16=True)
    m = onnx.load(str(path))
    want = value_types(m)
    got = onnx_meta.value_types(str(path))
    names = [v.name for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)]
    assert len(names) > 100 and {n: got[n] for n in names} == {n: want[n] for n in names}
    assert set(got.values()) >= {1, 7, 10}  # float32, int64, float16 tensors all present


def test_parse_batch():
    assert parse_batch("1:16:64") == (1, 16, 64)
    assert parse_batch((2, 2, 2)) == (2, 2, 2)
    for bad in ("1:2", "3:2:4", "0:1:1", "1:2:x", "", (1, 2)):
        with pytest.raises(BdmError):
            parse_batch(bad)


def test_check_batch_follows_the_engine_profile(tmp_path):
    """--check feeds TensorRT a batch inside the engine's profile (a 4:8:8 engine refuses batch 3)."""
    from bdm_export.check import _profile_batch

    plan = tmp_path / "e.plan"
    for (lo, hi), want in [((4, 8), 4), ((1, 2), 2), ((1, 64), 3)]:
        (tmp_path / "e.plan.json").write_text(json.dumps({fmt.K_PROFILE: {"min": lo, "opt": hi, "max": hi}}))
        assert _profile_batch(plan, 3) == want


def test_no_clip_is_stored_in_the_graph_and_changes_it(tiny_checkpoint, tmp_path, capsys):
    """--no-clip overrides the checkpoint's clip_denoised: x_hat at t = 1 is then far outside [-1, 1]."""

    assert checkpoint.load(tiny_checkpoint)[2]["sampler"]["clip_denoised"] is True
    for flag, folder in (("--clip", tmp_path / "clip"), ("--no-clip", tmp_path / "noclip")):
        code, _, err = run_cli(["--ckpt", tiny_checkpoint, "--out-dir", folder, flag, "--no-engine"], capsys)
        assert code == 0, err
        assert read_metadata(folder / "bdm.onnx")[fmt.K_CLIP_DENOISED] is (flag == "--clip")
    # From t = 1, x_hat = (z - sigma eps_hat) / alpha_1 (alpha_1 ~ 7e-3) is far outside [-1, 1]: clipping it
    # changes the update. Each graph's z_next must match the PyTorch step with the same setting.
    import onnxruntime as ort

    from bdm_train.sampling import ddim_step

    model, process, _ = checkpoint.load(tiny_checkpoint)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 1, 16, 16), dtype=np.float32)
    feed = {fmt.Z: z, fmt.T: np.ones(2, np.float32), fmt.S: np.full(2, 0.9, np.float32),
            fmt.ETA: np.zeros(1, np.float32), fmt.NOISE: np.zeros_like(z),
            fmt.T_PREV: np.ones(2, np.float32), fmt.U_X_PREV: np.zeros_like(z)}   # no history: first order
    z_next = {}
    for clip, name in ((True, "clip"), (False, "noclip")):
        session = ort.InferenceSession(str(tmp_path / name / "bdm.onnx"), providers=["CPUExecutionProvider"])
        z_next[clip] = session.run([fmt.Z_NEXT], feed)[0]
        with torch.no_grad():
            want = ddim_step(model, process, torch.from_numpy(z), torch.ones(2), torch.full((2,), 0.9), 0.0,
                             torch.zeros(2, 1, 16, 16), clip_denoised=clip)[0].numpy()
        # 1e-3 relative: the unclipped update multiplies float32 rounding of x_hat by alpha_s / alpha_t (~20x
        # here), so the two float32 implementations differ by ~1e-4 of the scale; a wrong clip setting is >10%.
        assert np.abs(z_next[clip] - want).max() < 1e-3 * np.abs(want).max(), clip
    assert np.abs(z_next[True] - z_next[False]).max() > 0.1 * np.abs(z_next[False]).max()


def test_solver_grid_steps_eta_are_stored(tiny_checkpoint, tmp_path, capsys):
    """--solver/--grid/--steps/--eta set the graph's defaults; dpmpp2m without --eta stores eta 0
    (deterministic, B11), with --eta 1 its SDE form (B16)."""
    code, stdout, err = run_cli(["--ckpt", tiny_checkpoint, "--out-dir", tmp_path, "--no-engine", "--solver",
                                 "dpmpp2m", "--grid", "spectral", "--steps", 12], capsys)
    assert code == 0, err
    meta = read_metadata(tmp_path / "bdm.onnx")
    assert (meta[fmt.K_DEFAULT_SOLVER], meta[fmt.K_DEFAULT_GRID]) == ("dpmpp2m", "spectral")
    assert (meta[fmt.K_DEFAULT_STEPS], meta[fmt.K_DEFAULT_ETA]) == (12, 0.0)
    assert "default dpmpp2m, 12 steps on the spectral grid" in stdout
    code, stdout, err = run_cli(["--ckpt", tiny_checkpoint, "--out-dir", tmp_path, "--no-engine", "--solver",
                                 "dpmpp2m", "--grid", "edm", "--steps", 20, "--eta", 1], capsys)
    assert code == 0, err
    meta = read_metadata(tmp_path / "bdm.onnx")
    assert (meta[fmt.K_DEFAULT_SOLVER], meta[fmt.K_DEFAULT_ETA]) == ("dpmpp2m", 1.0)
    assert "default dpmpp2m eta 1, 20 steps on the edm grid" in stdout
    code, _, err = run_cli(["--ckpt", tiny_checkpoint, "--out-dir", tmp_path, "--no-engine", "--grid", "power",
                            "--eta", 0.3], capsys)
    assert code == 0, err
    meta = read_metadata(tmp_path / "bdm.onnx")
    assert (meta[fmt.K_DEFAULT_SOLVER], meta[fmt.K_DEFAULT_GRID], meta[fmt.K_DEFAULT_ETA]) == ("ddim", "power", 0.3)
