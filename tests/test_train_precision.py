"""BF16 autocast training (issue 19): the option, what a checkpoint records, and exact resume per precision."""
import json
import os

import numpy as np
import pytest
import torch

from bdm_runtime import cpu
from bdm_train import checkpoint
from bdm_train.options import resolve_precision
from bdm_train.train import main, train

SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(4,), blur_sigma_max=2.0, batch_size=8, lr=1e-3,
             warmup=2, log_every=1, ckpt_every=0, dropout=0.1, seed=5)


def _weights(path):
    s = checkpoint.load_state(path)
    return s["config"]["train"]["precision"], s["model"], s["ema"]


def _losses(path):
    with open(os.path.join(os.path.dirname(path), "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_resolve_precision():
    cpu_dev, cuda_dev = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("fp32", cuda_dev) == "fp32" and resolve_precision("bf16", cpu_dev) == "bf16"
    assert resolve_precision("auto", cuda_dev) == "bf16"          # what CUDA runs always did
    assert resolve_precision("auto", cpu_dev) == ("bf16" if cpu.native_bf16() else "fp32")
    # A checkpoint from before the option trained in float32 on CPU and bf16 on CUDA: resuming keeps that.
    assert resolve_precision("legacy", cpu_dev) == "fp32" and resolve_precision("legacy", cuda_dev) == "bf16"


def test_cpu_flags_read_from_cpuinfo():
    model, flags = cpu.cpu_info()
    if not os.path.isfile("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo here")
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert model and model in text and flags and all(f in text for f in flags)
    assert cpu.native_bf16() == any(f" {name}" in text for name in cpu.BF16_FLAGS)


def test_bf16_is_recorded_and_resumes_exactly(small_data, tmp_path):
    """At bf16, 3 + 3 resumed steps equal 6 straight, bit for bit; the run really ran in bf16 (its weights
    differ from the float32 run's by bf16 rounding, not by more)."""
    straight = train(small_data, tmp_path / "a", progress=False, steps=6, precision="bf16", **SMALL)
    train(small_data, tmp_path / "b", progress=False, steps=3, precision="bf16", **SMALL)
    resumed = train(None, tmp_path / "b", resume=True, progress=False, steps=6)   # precision from the checkpoint
    fp32 = train(small_data, tmp_path / "c", progress=False, steps=6, precision="fp32", **SMALL)
    (pa, ma, ea), (pb, mb, eb), (pc, mc, _) = _weights(straight), _weights(resumed), _weights(fp32)
    assert pa == pb == "bf16" and pc == "fp32"
    for name in ma:
        assert torch.equal(ma[name], mb[name]) and torch.equal(ea[name], eb[name]), name
    assert _losses(straight) == _losses(resumed)
    diff = max(float((ma[k] - mc[k]).abs().max()) for k in ma)
    # 6 Adam steps of lr 1e-3 move a weight by at most ~6e-3; bf16 changes the gradients' direction a little,
    # so the weights differ, by far less than the steps themselves.
    assert 0 < diff < 6e-3, diff
    np.testing.assert_allclose(_losses(straight), _losses(fp32), rtol=0.05)


def test_legacy_checkpoint_resumes_in_float32(small_data, tmp_path):
    """A checkpoint without ``precision`` (before the option) continues in float32 on CPU, exactly as before."""
    straight = train(small_data, tmp_path / "a", progress=False, steps=4, precision="fp32", **SMALL)
    old = train(small_data, tmp_path / "b", progress=False, steps=2, precision="fp32", **SMALL)
    state = torch.load(old, weights_only=True)
    del state["config"]["train"]["precision"]
    torch.save(state, old)
    resumed = train(None, tmp_path / "b", resume=True, progress=False, steps=4)
    (pa, ma, _), (pb, mb, _) = _weights(straight), _weights(resumed)
    assert pb == "fp32"
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_changing_precision_on_resume_is_noted(small_data, tmp_path, capsys):
    train(small_data, tmp_path, progress=False, steps=1, precision="fp32", **SMALL)
    capsys.readouterr()
    train(None, tmp_path, resume=True, progress=False, steps=2, precision="bf16")
    assert "changed precision" in capsys.readouterr().err
    assert _weights(tmp_path / "model.pt")[0] == "bf16"


def test_cli_refuses_an_unknown_precision(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", small_data, "--out", str(tmp_path / "x"), "--precision", "fp8"])
    assert e.value.code != 0 and "fp8" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_explicit_precision_equal_to_the_stored_one_is_no_change(small_data, tmp_path, capsys):
    """A checkpoint from before the option, resumed on CPU with ``--precision fp32`` (what it trained in):
    nothing changed, so no note; asking for bf16 is a change, and says so."""
    old = train(small_data, tmp_path, progress=False, steps=1, precision="fp32", **SMALL)
    state = torch.load(old, weights_only=True)
    del state["config"]["train"]["precision"]
    torch.save(state, old)
    capsys.readouterr()
    train(None, tmp_path, resume=True, progress=False, steps=2, precision="fp32", device="cpu")
    assert "changed precision" not in capsys.readouterr().err
    train(None, tmp_path, resume=True, progress=False, steps=3, precision="bf16", device="cpu")
    assert "changed precision (fp32 -> bf16)" in capsys.readouterr().err
