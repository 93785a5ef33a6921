"""Data-parallel training: 2 gloo processes under torchrun give the weights of 1 process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bdm_train import checkpoint
from bdm_train.train import train
from conftest import ROOT, make_shapes

# dropout 0: dropout masks are drawn per rank, so only a dropout-free run can match across layouts.
# float32: the tolerance below is float32's rounding (bf16 autocast, "auto" on CPUs with BF16 units,
# rounds every product to 8 bits, so two layouts would differ by bf16's rounding instead).
ARGS = dict(ch=8, ch_mult="1,2", num_res_blocks=1, attn="4", dropout=0.0, blur_sigma_max=2.0, num_classes=3,
            flip=True, steps=4, batch_size=8, lr=1e-3, warmup=2, seed=3, log_every=1, ckpt_every=0,
            precision="fp32")


def _cli_args(opts):
    args = []
    for k, v in opts.items():
        if isinstance(v, bool):
            args.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    images, labels = make_shapes(12, size=8, seed=2)  # 12 images, batch 8: steps cross an epoch boundary
    data = tmp_path / "d.npz"
    np.savez(data, images=images, labels=labels)

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bdm_train.train", "--data", str(data), "--out", str(tmp_path / "ddp"), "--device", "cpu",
           "--quiet"] + _cli_args(ARGS)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    single = train(str(data), tmp_path / "one", progress=False, device="cpu", **ARGS)

    a, b = checkpoint.load_state(single), checkpoint.load_state(tmp_path / "ddp" / "model.pt")
    assert a["step"] == b["step"] == 4
    # Same batches, same t/eps; the only difference is the order of float sums (per-rank means,
    # then the all-reduce average): gradients differ by float32 rounding (~1e-7 relative), and 4
    # Adam steps of lr 1e-3 carry that into weights at ~1e-7 (measured 5e-8). 1e-6 leaves 20x room
    # yet catches a real mismatch (another slice of data or noise moves weights by ~lr per step).
    for key in ("model", "ema"):
        for name, w in a[key].items():
            torch.testing.assert_close(b[key][name], w, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    # Only rank 0 wrote: one log line per step, not two.
    with open(tmp_path / "ddp" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # The logged loss is the all-reduced mean over the global batch, as in the single run.
    with open(os.path.join(os.path.dirname(single), "log.jsonl")) as f:
        ref = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose([r["loss"] for r in log], ref, rtol=1e-4)
    worst = max((b[k][n] - w).abs().max().item() for k in ("model", "ema") for n, w in a[k].items())
    print(f"max weight difference 1 vs 2 processes: {worst:.2e}")
