"""BF16 autocast training on CPUs (issue 19): is it faster, and does it train the same model?

``python -m benchmarks.train_precision speed``: one training step of the study's networks (ch 16, and the
ch 32 one of the capacity runs) in float32 and in bf16 autocast, interleaved in one process (one thread,
batch 64, 32x32), with the CPU's model and flags; ``results/train_precision_speed.json``.

``python -m benchmarks.train_precision quality``: short runs of the study's ``bdm10-spectral`` set-up
(and of the eps DDPM's) in both precisions at two seeds each, so that the difference between the
precisions is read against the run-to-run spread of float32 itself: the loss curves (mean loss per 100
steps) and FD-FMNIST after the run (1,000 samples, SDE-DPM-Solver++(2M) at 20 evaluations, the study's
cheapest setting per model). Resumable: runs live in ``runs/precision/``; ``results/train_precision.json``.
"""
import json
import os
import time

import click
import numpy as np

from bdm_runtime.errors import run_cli

from .bench.machine import machine_info
from .study.common import NET, OPT, RESULTS, ROOT, log, read_json, write_json

RUNS = os.path.join(ROOT, "runs", "precision")
# model -> (blur_sigma_max, param, the sampler of its cheapest setting in the second study)
MODELS = {
    "bdm10-spectral": (10.0, "spectral", dict(solver="dpmpp2m", grid="logsnr", eta=1.0, clip_denoised=False)),
    "ddpm": (0.0, "eps", dict(solver="dpmpp2m", grid="edm", eta=1.0, clip_denoised=True)),
}


def _step_fn(ch, precision, batch=64, size=32):
    """One optimiser step of the study's network at ``ch`` on random data, as a closure."""
    import torch

    from bdm_train.diffusion import BlurringDiffusion
    from bdm_train.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=size, ch=ch, ch_mult=NET["ch_mult"], num_res_blocks=NET["num_res_blocks"],
               attn_resolutions=NET["attn"], dropout=NET["dropout"])
    process = BlurringDiffusion(size, blur_sigma_max=10.0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, size, size) * 2 - 1

    def forward(z, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return net(z, t, y).float()

    def step():
        loss = process.loss(forward, x, spec=net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@click.group()
def cli():
    """BF16 autocast training on CPUs: speed and quality against float32."""


@cli.command("speed")
@click.option("--chs", default="16,32", show_default=True, help="Base channels of the networks timed.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True, help="Interleaved rounds.")
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True, help="Steps per round.")
def speed(chs, rounds, steps):
    """Training steps/s in float32 and bf16 autocast, interleaved, one thread, batch 64."""
    import torch

    torch.set_num_threads(1)
    out = dict(machine=machine_info(), threads=1, batch=64, rounds=rounds, steps_per_round=steps, nets={})
    for ch in (int(c) for c in chs.split(",")):
        fns = {p: _step_fn(ch, p) for p in ("fp32", "bf16")}
        times = {p: [] for p in fns}
        for fn in fns.values():
            fn()                                   # warm-up: oneDNN picks its kernels
        for _ in range(rounds):
            for p, fn in fns.items():
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[p].append((time.perf_counter() - t) / steps)
        med = {p: float(np.median(v)) for p, v in times.items()}
        out["nets"][f"ch{ch}"] = dict(seconds_per_step=med, bf16_speedup=round(med["fp32"] / med["bf16"], 3),
                                      all=times)
        log(f"ch {ch}: fp32 {1 / med['fp32']:.2f} steps/s, bf16 {1 / med['bf16']:.2f} steps/s, "
            f"x{med['fp32'] / med['bf16']:.2f}")
    write_json(os.path.join(RESULTS, "train_precision_speed.json"), out)


def _train(name, model, precision, seed, steps):
    from bdm_train.train import train

    from . import fmnist

    blur, param, _ = MODELS[model]
    out = os.path.join(RUNS, name)
    train(fmnist.folder(), out, resume=os.path.isfile(os.path.join(out, "model.pt")), progress=False,
          image_size=32, fit="pad", blur_sigma_max=blur, param=param, steps=steps, ckpt_every=250,
          sample_steps=50, sample_eta=0.0, device="cpu", threads=1, precision=precision,
          **NET, **dict(OPT, seed=seed))
    return out


def _loss_curve(folder, every=100):
    """Mean loss per ``every`` steps from ``log.jsonl`` (one line per ``log_every`` = 100 steps)."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and int(r["step"]) % every == 0}


@cli.command("quality")
@click.option("--models", default="bdm10-spectral", show_default=True, help=f"Of {', '.join(MODELS)}.")
@click.option("--steps", type=click.IntRange(1), default=1500, show_default=True, help="Training steps per run.")
@click.option("--seeds", default="0,1", show_default=True, help="Training seeds per precision.")
@click.option("--n", type=click.IntRange(1), default=1000, show_default=True, help="Samples for FD.")
def quality(models, steps, seeds, n):
    """Short runs in both precisions at several seeds: loss curves and FD (resumable)."""
    import torch

    from bdm_train.sample_cli import sample_checkpoint
    from bdm_runtime.images import to_uint8

    from . import metrics

    torch.set_num_threads(1)
    path = os.path.join(RESULTS, "train_precision.json")
    res = read_json(path, dict(machine=machine_info(), steps=steps, n=n, runs={}))
    ref = None
    for model in models.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            for precision in ("fp32", "bf16"):
                name = f"{model}_{precision}_seed{seed}_steps{steps}"
                if name in res["runs"]:
                    continue
                log(f"training {name}")
                start = time.time()
                folder = _train(name, model, precision, seed, steps)
                seconds = time.time() - start
                x = sample_checkpoint(os.path.join(folder, "model.pt"), n=n, steps=20, seed=1, device="cpu",
                                      **MODELS[model][2])[0]
                ref = ref if ref is not None else metrics.reference_stats()
                fd = metrics.evaluate(to_uint8(x), ref)["fd"]
                res["runs"][name] = dict(model=model, precision=precision, seed=seed, fd=fd,
                                         train_seconds=round(seconds, 1), loss=_loss_curve(folder))
                log(f"{name}: FD {fd:.3f}")
                write_json(path, res)


def main(args=None):
    run_cli(cli, args, prog_name="python -m benchmarks.train_precision")


if __name__ == "__main__":
    main()
