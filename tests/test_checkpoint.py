"""Checkpoints: schema, round trip, weights_only loading, atomic writes, refusing foreign files."""
import json
import os
import random

import numpy as np
import pytest
import torch

from bdm_train import checkpoint
from bdm_train.diffusion import BlurringDiffusion
from bdm_train.unet import UNet
from bdm_runtime.errors import BdmError


def _config(model, process):
    return {"model": model.config(), "process": process.config(),
            "sampler": {"clip_denoised": True, "steps": 50, "eta": 0.0}, "train": {"seed": 0}, "data": {}}


@pytest.fixture
def saved(tmp_path):
    """A checkpoint whose raw and EMA weights differ and are all non-zero."""
    torch.manual_seed(0)
    model = UNet(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=2)
    ema = UNet(**model.config())
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters()):
            p.normal_(0, 0.2)
            q.normal_(0, 0.2)
    process = BlurringDiffusion(8, blur_sigma_max=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.rand(2)).sum().backward()
    opt.step()
    path = str(tmp_path / "model.pt")
    checkpoint.save(path, _config(model, process), model, ema, step=7, optimizer=opt)
    return path, model, ema


def test_round_trip_identical_outputs(saved):
    path, model, ema = saved
    z, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    for use_ema, ref in ((True, ema), (False, model)):
        loaded, process, config = checkpoint.load(path, ema=use_ema)
        assert not loaded.training
        assert torch.equal(loaded(z, t, y), ref.eval()(z, t, y))  # bit-identical
    assert process.config() == BlurringDiffusion(8, blur_sigma_max=2.0).config()
    json.dumps(config)  # plain types only


def test_weights_only_schema(saved):
    path = saved[0]
    state = torch.load(path, weights_only=True)
    assert state["format"] == "bdm.checkpoint" and state["version"] == 1 and state["step"] == 7
    assert set(state) >= {"config", "model", "ema", "optimizer", "scheduler", "rng", "step"}
    assert state["rng"]["torch"].dtype == torch.uint8
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert [f for f in os.listdir(os.path.dirname(path))] == ["model.pt"]  # no temp files left


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_failed_save_keeps_old_file(saved):
    path, model, ema = saved
    before = open(path, "rb").read()
    bad_config = {"model": model.config(), "oops": lambda: None}  # a lambda cannot be pickled: save fails
    with pytest.raises(Exception):
        checkpoint.save(path, bad_config, model, ema, step=8)
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["model.pt"]


def _corrupt(kind, path, good):
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        raw = open(good, "rb").read()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "newer":
        state = torch.load(good, weights_only=True)
        state["version"] = 2
        torch.save(state, path)
    elif kind == "pickle":  # a non-weights file (arbitrary objects): refused, never unpickled
        torch.save({"format": "bdm.checkpoint", "x": random.Random(0)}, path)


@pytest.mark.parametrize("kind,match", [("random", "not a torch checkpoint"), ("truncated", "not a torch checkpoint"),
                                        ("empty", "not a torch checkpoint"), ("foreign", "not a bdm checkpoint"),
                                        ("newer", "newer"), ("pickle", "pickled Python objects")])
def test_refuses_bad_files(saved, tmp_path, kind, match):
    bad = tmp_path / f"bad_{kind}.pt"
    _corrupt(kind, bad, saved[0])
    with pytest.raises(BdmError, match=match) as e:
        checkpoint.load(str(bad))
    assert f"bad_{kind}.pt" in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BdmError, match="does not exist") as e:
        checkpoint.load(str(tmp_path / "absent.pt"))
    assert "absent.pt" in str(e.value)


def test_config_mismatch(saved, tmp_path):
    state = torch.load(saved[0], weights_only=True)
    state["config"]["model"]["ch"] = 16
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(BdmError, match="does not match") as e:
        checkpoint.load(str(tmp_path / "mismatch.pt"))
    assert "mismatch.pt" in str(e.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:abc", "cuda:99", "meta"])
def test_unknown_device(saved, device):
    with pytest.raises(BdmError, match="device") as e:
        checkpoint.load(saved[0], device=device)
    assert "\n" not in str(e.value)


def test_release_bytes_reproducible(saved, tmp_path):
    """The same checkpoint released twice, under different names, is the same file (a release's sha256 is a
    fact of its weights, not of the temporary file it was written through)."""
    a, b = tmp_path / "a" / "model.pt", tmp_path / "b" / "other.pt"
    checkpoint.release(saved[0], str(a), sampler={"steps": 20})
    checkpoint.release(saved[0], str(b), sampler={"steps": 20})
    assert a.read_bytes() == b.read_bytes()
    checkpoint.release(saved[0], str(b), sampler={"steps": 21})
    assert a.read_bytes() != b.read_bytes()
