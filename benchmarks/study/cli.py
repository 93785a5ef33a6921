"""``python -m benchmarks.study``: run the stages, print the information argument, diagnose x_hat."""
import os

import click

from bdm_runtime.errors import BdmError

from .analysis import denoising_error, error_gain, information
from .common import MODELS, NET, NFES, OPT, RESULTS, RUNS, SMOKE, STEPS, ckpt_step
from .stages import Study

STAGES = ("train", "export", "sample", "parity", "eval", "report", "ship")


@click.group()
def cli():
    """Blurring diffusion vs DDPM on Fashion-MNIST, eps vs spectral: quality vs network evaluations."""


def _models(only):
    names = [m.strip() for m in only.split(",") if m.strip()]
    if not names or any(m not in MODELS for m in names):
        raise BdmError(f"--models {only!r}: choose from {', '.join(MODELS)}")
    return {m: MODELS[m] for m in names}


@cli.command("run")
@click.option("--stages", default=",".join(STAGES[:-1]), show_default=True,
              help=f"Comma-separated subset of {', '.join(STAGES)} (ship replaces models/fmnist32: ask for it).")
@click.option("--hours", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop starting training chunks after this long (per sitting).")
@click.option("--steps", type=click.IntRange(1), default=STEPS, show_default=True, help="Training steps per model.")
@click.option("--models", "only", default=",".join(MODELS), show_default=True,
              help="Comma-separated subset of the models, e.g. to run them in two processes at once.")
@click.option("--n", "n", type=click.IntRange(1), default=1000, show_default=True, help="Samples per point.")
@click.option("--chunk", type=click.IntRange(1), default=250, show_default=True, help="Images per sample file.")
@click.option("--ch", type=click.IntRange(1), default=NET["ch"], show_default=True, help="UNet base channels.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=NET["dropout"], show_default=True,
              help="UNet dropout.")
@click.option("--ch-mult", default=",".join(map(str, NET["ch_mult"])), show_default=True)
@click.option("--num-res-blocks", type=click.IntRange(1), default=NET["num_res_blocks"], show_default=True)
@click.option("--attn", default=",".join(map(str, NET["attn"])) or "none", show_default=True,
              help="Attention resolutions, or none.")
@click.option("--batch-size", type=click.IntRange(1), default=OPT["batch_size"], show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=OPT["lr"], show_default=True)
@click.option("--runs", default=RUNS, show_default=True, type=click.Path(file_okay=False))
@click.option("--results", default=RESULTS, show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="Training (and torch sampling) device.")
@click.option("--backend", type=click.Choice(["runtime", "torch"]), default="runtime", show_default=True,
              help="Sample through the runtime on the exported ONNX, or with the PyTorch reference sampler.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads of torch and ONNX Runtime [all].")
@click.option("--allow-partial", is_flag=True, help="Export/sample/evaluate checkpoints short of --steps.")
@click.option("--nfes", default=",".join(map(str, NFES)), show_default=True,
              help="Network evaluations of the solver x grid sweep (e.g. 10,20 to answer those first).")
@click.option("--keep", default="", help="Training steps whose checkpoints are kept as model_stepN.pt, e.g. 6000,12000.")
@click.option("--smoke", is_flag=True, help="Tiny network, 4 steps, 16 samples, under /tmp: checks the wiring.")
def run_cmd(stages, hours, steps, only, n, chunk, ch, dropout, ch_mult, num_res_blocks, attn, batch_size, lr, runs,
            results, device, backend, threads, allow_partial, nfes, keep, smoke):
    """Run (or resume) the study's stages in order."""
    import torch

    from bdm_train.options import int_list

    from . import report as rep

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        raise BdmError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    models = _models(only)
    if any(k < 1 for k in int_list(nfes, "nfes")):
        raise BdmError(f"--nfes {nfes!r}: network evaluations must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    net = dict(ch=ch, ch_mult=tuple(int_list(ch_mult, "ch-mult")), num_res_blocks=num_res_blocks,
               attn=tuple(int_list(attn, "attn")), dropout=dropout)
    kw = dict(runs=runs, results=results, models=models, steps=steps, n=n, chunk=chunk, net=net,
              opt=dict(batch_size=batch_size, lr=lr), device=device, backend=backend,
              threads=threads or torch.get_num_threads(), nfes=tuple(int_list(nfes, "nfes")))
    if smoke:
        tmp = os.path.join("/tmp", "bdm_study_smoke")
        kw.update(runs=os.path.join(tmp, "runs"), results=os.path.join(tmp, "results"), steps=SMOKE["steps"],
                  n=SMOKE["n"], chunk=SMOKE["chunk"], net=SMOKE["net"], points=SMOKE["points"],
                  nfes=SMOKE["nfes"], ancestral_nfes=SMOKE["ancestral_nfes"], sde_nfes=SMOKE["sde_nfes"],
                  grids=SMOKE["grids"],
                  plot=os.path.join(tmp, "quality_vs_steps.png"),
                  opt=dict(batch_size=8, warmup=1))
    study = Study(**kw)
    allow = allow_partial or smoke
    if "train" in chosen:
        study.train(hours=hours, chunk_steps=2 if smoke else 1000, keep=tuple(int_list(keep, "keep")))
    if "export" in chosen and backend == "runtime":
        study.export(allow)
    # Twice: the solver x grid sweep uses the clip setting the legacy points measured better.
    for _ in range(2 if {"sample", "eval"} <= set(chosen) else 1):
        if "sample" in chosen:
            study.sample(allow)
        if "eval" in chosen:
            study.evaluate(allow)
    if "parity" in chosen and backend == "runtime":
        study.parity(n=4 if smoke else 16, steps=3 if smoke else 10, allow_partial=allow)
    if "report" in chosen:
        rep.report(study)
    if "ship" in chosen and not smoke:
        rep.ship(study)


@cli.command("info")
def info_cmd():
    """Information left along t for several blur_sigma_max, and how much a step amplifies the network's error."""
    res = information()
    click.echo(f"Gaussian-channel information left in z_t (nats per image; DC holds "
               f"{100 * res['dc_fraction']:.0f}% of the variance)")
    click.echo("blur_sigma_max " + " ".join(f"t={t:<8g}" for t in res["times"]))
    for b, row in res["nats"].items():
        click.echo(f"{b:>14g} " + " ".join(f"{v:<10.2f}" for v in row))
    for eta in (0.0, 1.0):
        g = error_gain(eta=eta)
        click.echo(f"\nlargest gain of a step on the network's eps error, eta={eta:g}, steps with t <= {g['late']:g}")
        click.echo("blur_sigma_max " + " ".join(f"{n:>5d} steps" for n in g["step_counts"]))
        for b, row in g["gain"].items():
            click.echo(f"{b:>14g} " + " ".join(f"{v:>11.2f}" for v in row))


@cli.command("diagnose")
@click.option("--runs", default=RUNS, show_default=True, type=click.Path(file_okay=False))
@click.option("--models", "only", default=",".join(MODELS), show_default=True)
def diagnose_cmd(runs, only):
    """How well each trained model's x_hat recovers test images along t (low frequencies; pixels after clipping)."""
    study = Study(runs=runs, models=_models(only))
    for model in study.models:
        if not os.path.isfile(study.ckpt(model)):
            click.echo(f"{model}: {study.ckpt(model)} does not exist (not trained yet); skipped")
            continue
        click.echo(f"{model} (step {ckpt_step(study.ckpt(model))}): t, MSE of x_hat on the 4x4 lowest DCT "
                   "frequencies, MSE of the clipped x_hat in pixels")
        for t, (low, clipped) in denoising_error(study.ckpt(model)).items():
            click.echo(f"  t={t:<5g} {low:10.4f} {clipped:10.4f}")


SCALE_STAGES = ("train", "measure", "report", "ship")


@cli.command("scale")
@click.option("--stages", default="train,measure,report", show_default=True,
              help=f"Subset of {', '.join(SCALE_STAGES)} (ship applies the shipping rule and may replace "
                   "models/fmnist32: ask for it).")
@click.option("--models", "only", default=None, help="Comma-separated lines of the third study [all].")
@click.option("--hours", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop starting training chunks after this long (per sitting).")
@click.option("--n", "n", type=click.IntRange(1), default=1000, show_default=True, help="Samples per point.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="CPU threads.")
@click.option("--upto", type=click.IntRange(1), default=None,
              help="Train and measure only the budgets up to this many steps [all].")
def scale_cmd(stages, only, hours, n, threads, upto):
    """The third study (issue 19): blur strength, budget and capacity (resumable; two processes, one core each)."""
    import torch

    from . import scale, scale_report, scale_ship

    names = list(scale.LINES) if only is None else [m.strip() for m in only.split(",") if m.strip()]
    if not names or any(m not in scale.LINES for m in names):
        raise BdmError(f"--models {only!r}: choose from {', '.join(scale.LINES)}")
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if not chosen or any(s not in SCALE_STAGES for s in chosen):
        raise BdmError(f"--stages {stages!r}: choose from {', '.join(SCALE_STAGES)}")
    torch.set_num_threads(threads)
    if "train" in chosen:
        scale.train(names, hours=hours, upto=upto)
    if "measure" in chosen:
        scale.measure(names, n=n, threads=threads, upto=upto)
    if "report" in chosen:
        scale_report.report()
    if "ship" in chosen:   # every line's rows (the rule compares them all), whatever --models says; it logs why
        scale_ship.ship(n=n, threads=threads)


def main(args=None):
    from bdm_runtime.errors import run_cli

    run_cli(cli, args)
