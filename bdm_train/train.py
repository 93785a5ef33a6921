"""Training: ``bdm-train`` and ``train(data, out, **options)``.

The loss: ``t ~ U(0, 1)``, ``z_t = V(alpha_t V^T x) + sigma_t eps`` (B5), ``|| target - f(z_t, t) ||^2``
with the target of the parameterisation: ``eps`` (B8) or B14's unit-variance spectral target, whose
per-frequency data statistics are measured once, before step 1, on a seeded subset of the data.

Three parts: set-up (``prepare.setup``: data, statistics, network, optimiser, and a resumed run's
states), the step loop here (:func:`train_steps`, one :func:`train_step` each), and checkpointing
(:func:`_previous` reads, ``prepare.Run.save`` writes ``model.pt`` atomically, :func:`_append_log`).
The options are ``options.py``'s; where each step's data and randomness come from is
``batches.py``'s (reproducible by construction: a resumed run continues bit for bit).
"""
import json
import math
import os
import sys
import time

import click
import numpy as np

from bdm_runtime.errors import BdmError, run_cli
from bdm_runtime.format import PARAMS
from bdm_runtime.limits import MAX_STEPS

from . import data as datalib
from .batches import Dist, batch_indices, batch_noise, derived_seed
from .options import DEFAULTS, PRECISIONS, SEED_MAX, resolve_options, resolve_precision
from .prepare import setup
from .resources import default_threads
from .runfolder import RunLock, rollback_log


# -- what the step loop keeps besides the weights -----------------------------------------------
def ema_update(ema, model, decay, step):
    """``ema <- d ema + (1 - d) theta`` with ``d = min(decay, (1 + step) / (10 + step))`` (warm-up)."""
    import torch

    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        e = list(ema.parameters())
        torch._foreach_lerp_(e, [p.detach() for p in model.parameters()], 1.0 - d)


def write_samples(path, ema, process, opts, device):
    """A grid of EMA samples (seed 0, the checkpoint's sampler settings)."""
    from bdm_runtime.images import save_grid, to_uint8

    from .sampling import sample

    n, nc = opts["sample_n"], opts["num_classes"]
    labels = np.arange(n) % nc if nc else None
    x = sample(ema, process, n, seed=0, steps=opts["sample_steps"], eta=opts["sample_eta"], labels=labels,
               clip_denoised=True, device=device)
    size = opts["image_size"]
    try:
        save_grid(to_uint8(x.cpu().numpy()), path, ncols=int(math.ceil(math.sqrt(n))), scale=max(1, 64 // size))
    except OSError as e:
        raise BdmError(f"cannot write {path}: {e.strerror or e} (is the disk full?)") from None


# -- the entry point ----------------------------------------------------------------------------
def train(data, out, resume=False, progress=True, **options):
    """Train a blurring diffusion model; returns the checkpoint path ``out/model.pt``.

    Options are those of ``bdm-train`` with underscores (``batch_size=64``, ``ch_mult=(1, 2, 2)``, ...);
    ``resume=True`` continues ``out/model.pt`` up to ``steps`` total steps (``data=None``: the stored path).
    """
    out = os.fspath(out)
    path = os.path.join(out, "model.pt")
    with RunLock(out) as lock:   # held from before the checkpoint is read to after the last one is written
        if os.path.isdir(out) and int(os.environ.get("RANK", "0")) == 0:
            lock.acquire()
        return _train_locked(data, out, path, resume, progress, options, lock)


def _train_locked(data, out, path, resume, progress, options, lock):
    """:func:`train` under the run folder's lock (taken here once the folder exists, if not before)."""
    import torch

    state = _previous(path, resume)
    if state is not None and state.get("optimizer") is None:
        raise BdmError(f"{path} is a release checkpoint (EMA weights only, no optimizer state): it samples and "
                       "exports but cannot be resumed; resume the training checkpoint it was made from, or train "
                       "anew into another --out")
    opts = resolve_options(options, state["config"]["train"] if state else None)
    if state is not None and state["step"] >= opts["steps"]:
        print(f"note: {path} is already at step {state['step']}, --steps is {opts['steps']}: nothing to train; "
              "the checkpoint and its options are unchanged", file=sys.stderr)
        return path
    if data is None:
        if state is None:
            raise BdmError("no --data given")
        data = state["config"]["data"]["path"]

    opts["threads"] = opts["threads"] or default_threads()   # stored: a resumed run keeps the count
    torch.set_num_threads(opts["threads"])   # on shared cores 1 thread can beat 2 (OpenMP threads stall each other)
    dist = Dist(opts["device"])
    opts["precision"] = resolve_precision(opts["precision"], dist.device)   # stored: --resume keeps it
    if state is not None:
        before = resolve_precision(state["config"]["train"].get("precision", "legacy"), dist.device)
        if before != opts["precision"]:
            print(f"note: resuming with changed precision ({before} -> {opts['precision']}): the run will differ "
                  "from an uninterrupted one", file=sys.stderr)
    try:
        run = setup(data, out, path, opts, state, dist)
        if dist.main:
            lock.acquire(create=True)
            if state is None:
                _previous(path, False)    # another run may have finished into it meanwhile
            else:
                rollback_log(out, run.step)   # the lines past the checkpoint come again
        train_steps(run, progress)
        return path
    finally:
        dist.close()


# -- the step loop ------------------------------------------------------------------------------
def train_step(run):
    """One optimiser step on this rank's slice of the global batch ``run.step``; returns the loss."""
    import torch

    opts, dist, device, step = run.opts, run.dist, run.device, run.step
    B = opts["batch_size"]
    b = B // dist.world
    lo = dist.rank * b
    idx = batch_indices(opts["seed"], step, run.n, B)[lo:lo + b].to(device)
    t, eps, flip, drop = (v[lo:lo + b].to(device) for v in batch_noise(opts["seed"], step, B, run.shape))
    x = datalib.to_float(run.images[idx])
    if opts["flip"]:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y, nc = None, opts["num_classes"]
    if nc:
        y = torch.where(drop < opts["p_uncond"], torch.full_like(run.labels[idx], nc), run.labels[idx])  # B12

    def forward(z, t, y):
        """The network in bf16 autocast at ``--precision bf16``; the forward process (B5) and the loss stay
        float32 outside it, and the weights, their gradients and the optimiser are float32 throughout."""
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=opts["precision"] == "bf16"):
            return run.net(z, t, y).float()

    torch.manual_seed(derived_seed(opts["seed"], 2, step) + dist.rank)   # dropout masks
    loss = run.process.loss(forward, x, y, t=t, eps=eps, spec=run.model)  # B8 / B14, mean over this rank's slice
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if opts["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), opts["grad_clip"])
    run.opt.step()
    run.sched.step()
    ema_update(run.ema, run.model, opts["ema_decay"], step)
    run.step += 1
    return loss.detach()


def train_steps(run, progress):
    """Steps up to ``steps``: the loss and images/s logged every ``log_every``, checkpoints every
    ``ckpt_every``, sample grids every ``sample_every``, and a checkpoint at the end."""
    import torch

    opts, dist = run.opts, run.dist
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=opts["steps"], initial=min(run.step, opts["steps"]), desc="training", unit="step",
                   dynamic_ncols=True)
    run.net.train()
    meter = dict(sum=torch.zeros((), device=run.device), count=0, t0=time.perf_counter(), s0=run.step)
    meter.update(run.meter)   # a resumed run's losses since its last log line (see Run.save)
    run.meter = meter
    while run.step < opts["steps"]:
        meter["sum"] += train_step(run)
        meter["count"] += 1
        if run.step % opts["log_every"] == 0 or run.step == opts["steps"]:
            log_losses(run, meter, bar)
        if bar is not None:
            bar.update(1)
        if opts["ckpt_every"] and run.step % opts["ckpt_every"] == 0:
            run.save()
        if opts["sample_every"] and run.step % opts["sample_every"] == 0 and dist.main:
            write_samples(os.path.join(run.out, f"samples_{run.step:06d}.png"), run.ema, run.process, opts,
                          run.device)
    if bar is not None:
        bar.close()
    run.save()
    dist.barrier()


def log_losses(run, meter, bar):
    """The mean loss of the global batches since the last line (as one process would log it)."""
    dist = run.dist
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(meter["sum"])
        meter["sum"] /= dist.world
    mean = meter["sum"].item() / meter["count"]
    if not math.isfinite(mean):
        raise BdmError(f"the loss became {mean} by step {run.step}: lower --lr or raise --warmup")
    dt = time.perf_counter() - meter["t0"]
    rate = (run.step - meter["s0"]) * run.opts["batch_size"] / dt if dt > 0 else float("nan")
    if dist.main:
        _append_log(run.out, dict(step=run.step, loss=round(mean, 6), lr=run.opt.param_groups[0]["lr"],
                                  img_per_s=round(rate, 1)))
    if bar is not None:
        bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.0f}")
    meter["sum"].zero_()
    meter.update(count=0, t0=time.perf_counter(), s0=run.step)


# -- checkpointing (model.pt is written by Run.save) --------------------------------------------
def _previous(path, resume):
    """The checkpoint to continue (``resume``), else ``None``; refuses to replace a trained model silently."""
    from . import checkpoint as ckpt

    if not resume:
        if os.path.exists(path):
            raise BdmError(f"{path} already holds a model: continue it with --resume, or train into another --out "
                           "(or delete it first to start over)")
        return None
    if not os.path.lexists(path):
        raise BdmError(f"--resume: {path} does not exist (the run stopped before its first checkpoint?): "
                       "start it without --resume")
    state = ckpt.load_state(path)
    if not isinstance(state["config"].get("train"), dict):
        raise BdmError(f"{path}: checkpoint config lacks its training options: it cannot be resumed")
    return state


def _append_log(out, record):
    """One line of ``OUT/log.jsonl``; a full disk is one line naming the file."""
    path = os.path.join(out, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise BdmError(f"cannot write {path}: {e.strerror or e} (is the disk full?)") from None


# -- CLI ----------------------------------------------------------------------------------------
def _opt(*names, **kw):
    """An option with a new run's default from ``DEFAULTS``, shown by click. Only the options given on
    the command line reach :func:`train` (see :func:`cli`): a resumed run keeps its stored values."""
    default = DEFAULTS.get(names[0].lstrip("-").replace("-", "_"))
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default)) or "none"
    return click.option(*names, default=default, show_default=default is not None, **kw)


INT, POS = click.IntRange(0), click.IntRange(1)
UNIT = click.FloatRange(0, 1, max_open=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("--data", type=click.Path(), help="Image folder, .npz of uint8 images, or MNIST-style IDX file/folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (model.pt, samples).")
@_opt("--image-size", type=POS, help="Train at this size (default: the data's).")
@_opt("--fit", type=click.Choice(datalib.FITS), help="Make the data --image-size: centre pad or bicubic resize.")
@_opt("--ch", type=POS, help="Base channels.")
@_opt("--ch-mult", help="Channel multipliers per level.")
@_opt("--num-res-blocks", type=POS, help="Residual blocks per level.")
@_opt("--attn", help="Attention resolutions, comma-separated, or none.")
@_opt("--dropout", type=UNIT, help="Dropout in the residual blocks.")
@_opt("--steps", type=INT, help="Total optimizer steps.")
@_opt("--batch-size", type=POS, help="Global batch, split across torchrun processes.")
@_opt("--lr", type=click.FloatRange(0, min_open=True), help="AdamW learning rate.")
@_opt("--weight-decay", type=click.FloatRange(0), help="AdamW weight decay.")
@_opt("--warmup", type=INT, help="Linear learning-rate warm-up steps.")
@_opt("--grad-clip", type=click.FloatRange(0), help="Gradient norm clip, 0 = off.")
@_opt("--ema-decay", type=UNIT, help="Decay of the weights' exponential moving average.")
@_opt("--blur-sigma-max", type=click.FloatRange(0), help="sigma_B_max (B4); 0 = plain DDPM.")
@_opt("--min-scale", type=click.FloatRange(0, 1, min_open=True), help="d_min (B4).")
@_opt("--param", type=click.Choice(PARAMS), help="How the network's output is read: eps (B8) or spectral "
      "(B14: per-frequency preconditioning with the data's DCT statistics); resumed runs keep theirs.")
@_opt("--num-classes", type=INT, help="Class-conditional with this many classes (labels from the data); 0 = off.")
@_opt("--p-uncond", type=UNIT, help="Label dropout to the null label for guidance (B12).")
@_opt("--flip/--no-flip", help="Random horizontal flips (off by default).")
@_opt("--sample-every", type=INT, help="Write samples_STEP.png every N steps (0 = never).")
@_opt("--sample-n", type=POS, help="Images per sample grid.")
@_opt("--sample-steps", type=click.IntRange(1, MAX_STEPS), help="Sampler steps, stored as the checkpoint default.")
@_opt("--sample-eta", type=click.FloatRange(0, 1), help="Sampler eta (0 deterministic, 1 ancestral).")
@_opt("--ckpt-every", type=INT, help="Write OUT/model.pt every N steps (0 = only at the end).")
@_opt("--log-every", type=POS, help="Log loss and img/s every N steps.")
@_opt("--seed", type=click.IntRange(0, SEED_MAX), help="Seed of the weights, data order and noise.")
@click.option("--resume", is_flag=True, help="Continue OUT/model.pt (to --steps total); its options are kept "
              "unless given. Without it, an existing OUT/model.pt is refused, never replaced.")
@_opt("--device", help="auto, cpu, cuda or cuda:N.")
@_opt("--workers", type=INT, help="Threads decoding an image folder.")
@_opt("--threads", type=INT, help="torch CPU threads (0: the idle cores this process may use, or "
      "OMP_NUM_THREADS; stored with the run).")
@_opt("--precision", type=click.Choice(PRECISIONS), help="The network's arithmetic: fp32, or bf16 autocast "
      "(weights, loss and optimiser stay float32); auto = bf16 on CUDA and on CPUs with BF16 units (AMX, "
      "AVX512-BF16), else fp32. Stored in the checkpoint; --resume keeps it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def cli(ctx, data, out, resume, quiet, **options):
    """Train a Blurring Diffusion Model (Hoogeboom & Salimans 2022)."""
    from click.core import ParameterSource

    options = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    path = train(data, out, resume=resume, progress=not quiet, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(path)


def main(args=None):
    """Console entry point ``bdm-train``."""
    run_cli(cli, args, prog_name="bdm-train")


if __name__ == "__main__":
    main()
