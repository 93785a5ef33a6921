"""Training: ``bdm-train`` and ``train(data, out, **options)``.

The loss: ``t ~ U(0, 1)``, ``z_t = V(alpha_t V^T x) + sigma_t eps`` (B5), ``|| target - f(z_t, t) ||^2``
with the target of the parameterisation: ``eps`` (B8) or B14's unit-variance spectral target, whose
per-frequency data statistics are measured once, before step 1, on a seeded subset of the data.

Reproducibility by construction: the data order is a chain of per-epoch permutations and every
step's ``t``, ``eps``, flips and label drops come from a generator seeded by ``(seed, step)`` for
the *global* batch. Under ``torchrun`` each rank takes its contiguous slice, so N processes see
exactly the batch one process would; DDP averages the per-rank mean losses' gradients, which is
the gradient of the global mean. A resumed run needs only the step count (plus the states in the
checkpoint) to continue bit for bit.
"""
import copy
import functools
import json
import math
import os
import sys
import time

import click
import numpy as np

from bdm_runtime.errors import BdmError, run_cli
from bdm_runtime.format import PARAMS
from bdm_runtime.limits import MAX_STEPS, check_threads

from . import data as datalib

DEFAULTS = dict(
    image_size=None, fit=None,
    ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn=(16,), dropout=0.1,
    blur_sigma_max=20.0, min_scale=0.001, num_classes=0, param="spectral",
    steps=10000, batch_size=64, lr=2e-4, warmup=500, grad_clip=1.0, weight_decay=0.0,
    ema_decay=0.9995, p_uncond=0.1, flip=False, seed=0,
    sample_every=0, sample_n=64, sample_steps=50, sample_eta=0.0, ckpt_every=1000, log_every=100,
    device="auto", workers=0, threads=0,
)
SEED_MAX = 2 ** 64 - 1  # torch.manual_seed takes 0 .. 2^64 - 1
# Options that define the network or the data: a resumed run cannot change them.
FIXED = ("image_size", "fit", "ch", "ch_mult", "num_res_blocks", "attn", "blur_sigma_max", "min_scale",
         "num_classes", "param")
# B14's data statistics come from a fixed, seeded subset of at most this many training images.
STATS_IMAGES = 10000
# Options that change the trajectory: a resumed run may change them, but then it no longer equals
# an uninterrupted run (we say so).
TRAJECTORY = ("batch_size", "lr", "warmup", "grad_clip", "weight_decay", "ema_decay", "p_uncond", "flip",
              "seed", "dropout")


# -- options ------------------------------------------------------------------------------------
def int_list(value, name):
    """``"1,2,2"`` / ``(1, 2, 2)`` / ``""`` / ``"none"`` -> list of ints."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in ("", "none"):
            return []
        try:
            return [int(v) for v in value.replace(" ", "").split(",")]
        except ValueError:
            raise BdmError(f"--{name} must be comma-separated integers like 1,2,2, got {value!r}") from None
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    return [int(v) for v in value]


def valid_device(opt):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (parsed by torch, so ``cuda:abc`` is refused here)."""
    import torch

    if opt == "auto":
        return True
    try:
        return torch.device(opt).type in ("cpu", "cuda")
    except (RuntimeError, TypeError, ValueError):
        return False


def normalize(opts):
    """Plain JSON types, checked ranges."""
    o = dict(opts)
    o["ch_mult"] = int_list(o["ch_mult"], "ch-mult")
    o["attn"] = int_list(o["attn"], "attn")
    for k in ("ch", "num_res_blocks", "num_classes", "steps", "batch_size", "warmup", "seed", "sample_every",
              "sample_n", "sample_steps", "ckpt_every", "log_every", "workers", "threads"):
        o[k] = int(o[k])
    for k in ("dropout", "blur_sigma_max", "min_scale", "lr", "grad_clip", "weight_decay", "ema_decay",
              "p_uncond", "sample_eta"):
        o[k] = float(o[k])
    o["flip"] = bool(o["flip"])
    if o["image_size"] is not None:
        o["image_size"] = int(o["image_size"])
    check_threads(o["threads"], "--threads", allow_zero=True)
    check_threads(o["workers"], "--workers", allow_zero=True)
    checks = [
        (0 <= o["seed"] <= SEED_MAX, f"--seed must be in 0..{SEED_MAX} (torch.manual_seed's range), got {o['seed']}"),
        (o["steps"] >= 0, "--steps must be >= 0"),
        (o["batch_size"] >= 1, "--batch-size must be >= 1"),
        (o["lr"] > 0, "--lr must be > 0"),
        (o["warmup"] >= 0, "--warmup must be >= 0"),
        (0 <= o["ema_decay"] < 1, "--ema-decay must be in [0, 1)"),
        (0 <= o["p_uncond"] < 1, "--p-uncond must be in [0, 1)"),
        (0 <= o["dropout"] < 1, "--dropout must be in [0, 1)"),
        (o["ch"] >= 1 and o["ch_mult"] and min(o["ch_mult"]) >= 1, "--ch and --ch-mult must be positive"),
        (o["num_res_blocks"] >= 1, "--num-res-blocks must be >= 1"),
        (o["num_classes"] >= 0, "--num-classes must be >= 0"),
        (o["blur_sigma_max"] >= 0, "--blur-sigma-max must be >= 0"),
        (o["param"] in PARAMS, f"--param must be one of {', '.join(PARAMS)}, got {o['param']!r}"),
        (0 < o["min_scale"] <= 1, "--min-scale must be in (0, 1]"),
        (1 <= o["sample_steps"] <= MAX_STEPS and 0 <= o["sample_eta"] <= 1,
         f"--sample-steps must be in 1..{MAX_STEPS}, --sample-eta in [0, 1]"),
        (o["image_size"] is None or o["image_size"] >= 1, "--image-size must be positive"),
        (o["fit"] in (None,) + datalib.FITS, f"--fit must be one of {', '.join(datalib.FITS)}"),
        (o["log_every"] >= 1, "--log-every must be >= 1"),
        (o["sample_n"] >= 1, "--sample-n must be >= 1"),
        (o["ckpt_every"] >= 0, "--ckpt-every must be >= 0 (0 = only at the end)"),
        (o["sample_every"] >= 0, "--sample-every must be >= 0 (0 = never)"),
        (valid_device(o["device"]), f"--device must be auto, cpu, cuda or cuda:N, got {o['device']!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise BdmError(msg)
    return o


def resolve_options(options, stored=None):
    """Defaults, then the checkpoint's options (on resume), then the explicit ones."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise BdmError(f"unknown training option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    opts = dict(DEFAULTS)
    if stored is not None:
        opts.update({"param": "eps"}, **stored)   # checkpoints from before B14 are eps models
        old = normalize(opts)
        new = normalize(dict(opts, **given))
        for k in FIXED:
            if k in given and new[k] != old[k]:
                raise BdmError(f"--{k.replace('_', '-')} {new[k]} differs from the checkpoint's {old[k]}: "
                               f"a resumed run keeps the network and data settings")
        changed = [k for k in TRAJECTORY if k in given and new[k] != old[k]]
        if changed:
            print(f"note: resuming with changed {', '.join(changed)}: the run will differ from an "
                  f"uninterrupted one", file=sys.stderr)
    opts.update(given)
    return normalize(opts)


# -- distributed --------------------------------------------------------------------------------
class Dist:
    """Rank and world size; initialises torch.distributed when launched by ``torchrun``."""

    def __init__(self, device_opt):
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = "RANK" in os.environ and self.world > 1
        self.device = self._device(device_opt)
        if self.device.type == "cuda":  # else every rank's NCCL communicator and barrier use cuda:0
            torch.cuda.set_device(self.device)
        if self.enabled:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _device(self, opt):
        import torch

        if opt == "auto":
            opt = "cuda" if torch.cuda.is_available() else "cpu"
        if opt.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BdmError("--device cuda, but this torch sees no CUDA device")
            if opt == "cuda":
                return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
            if torch.device(opt).index >= torch.cuda.device_count():
                raise BdmError(f"--device {opt}, but this torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(opt)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -- the per-step randomness --------------------------------------------------------------------
def derived_seed(seed, stream, k):
    """A 63-bit seed for stream ``stream`` (0: epochs, 1: batch noise, 2: dropout) at index ``k``."""
    a, b = np.random.SeedSequence([int(seed), int(stream), int(k)]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, n):
    """The data order of one epoch."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, 0, epoch)))


def batch_indices(seed, step, n, batch_size):
    """Global batch ``step``: positions ``[step*B, (step+1)*B)`` of the chained epoch permutations."""
    import torch

    parts, pos, end = [], step * batch_size, (step + 1) * batch_size
    while pos < end:
        epoch, off = divmod(pos, n)
        take = min(end - pos, n - off)
        parts.append(epoch_permutation(seed, epoch, n)[off:off + take])
        pos += take
    return torch.cat(parts)


def batch_noise(seed, step, batch_size, shape):
    """``t``, ``eps``, flip mask and label-drop draw of the global batch ``step``."""
    import torch

    g = torch.Generator().manual_seed(derived_seed(seed, 1, step))
    t = torch.rand(batch_size, generator=g)
    eps = torch.randn((batch_size,) + tuple(shape), generator=g)
    flip = torch.rand(batch_size, generator=g) < 0.5
    drop = torch.rand(batch_size, generator=g)
    return t, eps, flip, drop


# -- the loop -----------------------------------------------------------------------------------
def build_model(opts, channels, stats=None):
    """UNet and process from the options (weights from the global torch RNG).

    ``stats`` is ``(data_mean, data_std)`` for ``param = "spectral"`` (B14): from
    :func:`spectral_statistics` for a new run, from the checkpoint for a resumed one.
    """
    from .diffusion import BlurringDiffusion
    from .unet import UNet

    mean, std = stats if opts["param"] == "spectral" else (None, None)
    model = UNet(in_channels=channels, image_size=opts["image_size"], ch=opts["ch"], ch_mult=opts["ch_mult"],
                 num_res_blocks=opts["num_res_blocks"], attn_resolutions=opts["attn"], dropout=opts["dropout"],
                 num_classes=opts["num_classes"], param=opts["param"], data_mean=mean, data_std=std)
    process = BlurringDiffusion(opts["image_size"], blur_sigma_max=opts["blur_sigma_max"],
                                min_scale=opts["min_scale"])
    return model, process


def spectral_statistics(images, image_size, seed, limit=STATS_IMAGES):
    """B14's per-frequency data mean and std, from a fixed subset of at most ``limit`` images.

    The subset is drawn with numpy from ``seed`` (the torch RNG, which draws the initial weights,
    is untouched), so the statistics, like the rest of a run, follow from the options alone.
    """
    import torch

    from .diffusion import BlurringDiffusion, data_statistics

    n = len(images)
    idx = np.sort(np.random.default_rng([int(seed), 14]).permutation(n)[:min(n, limit)])
    x = datalib.to_float(torch.from_numpy(images[idx]))
    return data_statistics(x, BlurringDiffusion(image_size))


def make_config(model, process, opts, ds, data_path):
    """The checkpoint config (plain types only)."""
    info = ds.info()
    info.update(path=os.path.abspath(os.fspath(data_path)), fit=opts["fit"], size=[opts["image_size"]] * 2)
    return {"model": model.config(), "process": process.config(),
            "sampler": {"clip_denoised": True, "steps": opts["sample_steps"], "eta": opts["sample_eta"]},
            "train": dict(opts), "data": info}


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


def train(data, out, resume=False, progress=True, **options):
    """Train a blurring diffusion model; returns the checkpoint path ``out/model.pt``.

    Options are those of ``bdm-train`` with underscores (``batch_size=64``, ``ch_mult=(1, 2, 2)``, ...);
    ``resume=True`` continues ``out/model.pt`` up to ``steps`` total steps (``data=None``: the stored path).
    """
    import torch

    from . import checkpoint as ckpt

    out = os.fspath(out)
    path = os.path.join(out, "model.pt")
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

    if opts["threads"] > 0:  # on shared cores 1 thread can beat 2 (OpenMP threads stall each other)
        torch.set_num_threads(opts["threads"])
    dist = Dist(opts["device"])
    try:
        return _train(data, out, path, opts, state, dist, progress)
    finally:
        dist.close()


def _previous(path, resume):
    """The checkpoint to continue (``resume``), else ``None``; refuses to replace a trained model silently."""
    from bdm_runtime.io import remove_stale

    from . import checkpoint as ckpt

    remove_stale(os.path.dirname(path))  # temporary files of a killed run: never read, removed here
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


def _train(data, out, path, opts, state, dist, progress):
    import torch

    from . import checkpoint as ckpt

    device = dist.device
    ds = datalib.load(data, opts["image_size"], opts["fit"], opts["workers"])
    opts["image_size"] = ds.size[0]
    if state is not None and opts["image_size"] != state["config"]["model"]["image_size"]:
        raise BdmError(f"data {data} is {ds.size[0]}x{ds.size[1]}, the checkpoint {path} was trained at "
                       f"{state['config']['model']['image_size']}")
    nc = opts["num_classes"]
    if nc:
        if ds.labels is None:
            raise BdmError(f"--num-classes {nc} needs labels, but {data} has none")
        if ds.labels.min() < 0 or ds.labels.max() >= nc:
            raise BdmError(f"labels in {data} span {ds.labels.min()}..{ds.labels.max()}, "
                           f"outside 0..{nc - 1} of --num-classes {nc}")
    B = opts["batch_size"]
    if B % dist.world:
        raise BdmError(f"--batch-size {B} is not divisible by the {dist.world} processes")
    b, lo = B // dist.world, dist.rank * (B // dist.world)

    stats = None
    if opts["param"] == "spectral":   # B14: measured before step 1; a resumed run keeps the stored ones
        m = state["config"]["model"] if state is not None else None
        stats = ((m["data_mean"], m["data_std"]) if m is not None
                 else spectral_statistics(ds.images, opts["image_size"], opts["seed"]))
    torch.manual_seed(opts["seed"])  # same initial weights on every rank
    model, process = build_model(opts, ds.channels, stats)
    try:
        model, process = model.to(device), process.to(device)
    except RuntimeError as e:
        raise BdmError(f"cannot move the model to {device}: {e}") from None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
    warmup = opts["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for g in opt.param_groups:  # explicitly changed options win over the stored ones
            g["initial_lr"], g["weight_decay"] = opts["lr"], opts["weight_decay"]
        sched.base_lrs = [opts["lr"]] * len(opt.param_groups)
        ckpt.set_rng_state(state["rng"])
        step = int(state["step"])
    config = make_config(model, process, opts, ds, data)

    net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    images = torch.from_numpy(ds.images).to(device)
    labels = torch.from_numpy(ds.labels).to(device) if nc else None
    shape = tuple(ds.images.shape[1:])
    n = len(ds)
    if dist.main:
        os.makedirs(out, exist_ok=True)

    def save():
        if dist.main:
            ckpt.save(path, config, model, ema, step, opt, sched)

    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=opts["steps"], initial=min(step, opts["steps"]), desc="training", unit="step",
                   dynamic_ncols=True)

    def forward(z, t, y):
        """The network in bf16 autocast on CUDA; the forward process (B5) stays float32 outside it."""
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return net(z, t, y)

    net.train()
    loss_sum = torch.zeros((), device=device)
    loss_count, t0, s0 = 0, time.perf_counter(), step
    while step < opts["steps"]:
        idx = batch_indices(opts["seed"], step, n, B)[lo:lo + b].to(device)
        t, eps, flip, drop = (v[lo:lo + b].to(device) for v in batch_noise(opts["seed"], step, B, shape))
        x = datalib.to_float(images[idx])
        if opts["flip"]:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = None
        if nc:
            y = torch.where(drop < opts["p_uncond"], torch.full_like(labels[idx], nc), labels[idx])  # B12
        torch.manual_seed(derived_seed(opts["seed"], 2, step) + dist.rank)  # dropout masks
        loss = process.loss(forward, x, y, t=t, eps=eps, spec=model)        # B8 / B14, mean over this rank's slice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"])
        opt.step()
        sched.step()
        ema_update(ema, model, opts["ema_decay"], step)
        step += 1
        loss_sum += loss.detach()
        loss_count += 1

        if step % opts["log_every"] == 0 or step == opts["steps"]:
            if dist.enabled:  # log the global batch's loss, as one process would
                import torch.distributed as tdist

                tdist.all_reduce(loss_sum)
                loss_sum /= dist.world
            mean = loss_sum.item() / loss_count
            if not math.isfinite(mean):
                raise BdmError(f"the loss became {mean} by step {step}: lower --lr or raise --warmup")
            dt = time.perf_counter() - t0
            rate = (step - s0) * B / dt if dt > 0 else float("nan")
            if dist.main:
                rec = dict(step=step, loss=round(mean, 6), lr=opt.param_groups[0]["lr"], img_per_s=round(rate, 1))
                _append_log(out, rec)
            if bar is not None:
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.0f}")
            loss_sum.zero_()
            loss_count, t0, s0 = 0, time.perf_counter(), step
        if bar is not None:
            bar.update(1)
        if opts["ckpt_every"] and step % opts["ckpt_every"] == 0:
            save()
        if opts["sample_every"] and step % opts["sample_every"] == 0 and dist.main:
            write_samples(os.path.join(out, f"samples_{step:06d}.png"), ema, process, opts, device)
    if bar is not None:
        bar.close()
    save()
    dist.barrier()
    return path


# -- CLI ----------------------------------------------------------------------------------------
def _opt(*names, **kw):
    return click.option(*names, default=None, show_default=False, **kw)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("--data", type=click.Path(), help="Image folder, .npz of uint8 images, or MNIST-style IDX file/folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (model.pt, samples).")
@_opt("--image-size", type=int, help="Train at this size (default: the data's).")
@_opt("--fit", type=click.Choice(datalib.FITS), help="Make the data --image-size: centre pad or bicubic resize.")
@_opt("--ch", type=int, help=f"Base channels [{DEFAULTS['ch']}].")
@_opt("--ch-mult", help="Channel multipliers per level [1,2,2].")
@_opt("--num-res-blocks", type=int, help=f"Residual blocks per level [{DEFAULTS['num_res_blocks']}].")
@_opt("--attn", help="Attention resolutions, comma-separated, or none [16].")
@_opt("--dropout", type=float, help=f"[{DEFAULTS['dropout']}]")
@_opt("--steps", type=int, help=f"Total optimizer steps [{DEFAULTS['steps']}].")
@_opt("--batch-size", type=int, help=f"Global batch, split across torchrun processes [{DEFAULTS['batch_size']}].")
@_opt("--lr", type=float, help=f"AdamW learning rate [{DEFAULTS['lr']}].")
@_opt("--weight-decay", type=float, help=f"[{DEFAULTS['weight_decay']}]")
@_opt("--warmup", type=int, help=f"Linear learning-rate warm-up steps [{DEFAULTS['warmup']}].")
@_opt("--grad-clip", type=float, help=f"Gradient norm clip, 0 = off [{DEFAULTS['grad_clip']}].")
@_opt("--ema-decay", type=float, help=f"[{DEFAULTS['ema_decay']}]")
@_opt("--blur-sigma-max", type=float, help=f"sigma_B_max (B4); 0 = plain DDPM [{DEFAULTS['blur_sigma_max']}].")
@_opt("--min-scale", type=float, help=f"d_min (B4) [{DEFAULTS['min_scale']}].")
@_opt("--param", type=click.Choice(PARAMS), help="How the network's output is read: eps (B8) or spectral "
      "(B14: per-frequency preconditioning with the data's DCT statistics) [spectral; resumed runs keep theirs].")
@_opt("--num-classes", type=int, help="Class-conditional with this many classes (labels from the data); 0 = off.")
@_opt("--p-uncond", type=float, help=f"Label dropout to the null label for guidance (B12) [{DEFAULTS['p_uncond']}].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [off].")
@_opt("--sample-every", type=int, help="Write samples_STEP.png every N steps (0 = never).")
@_opt("--sample-n", type=int, help=f"Images per sample grid [{DEFAULTS['sample_n']}].")
@_opt("--sample-steps", type=int, help=f"Sampler steps, stored as the checkpoint default [{DEFAULTS['sample_steps']}].")
@_opt("--sample-eta", type=float, help=f"Sampler eta (0 deterministic, 1 ancestral) [{DEFAULTS['sample_eta']}].")
@_opt("--ckpt-every", type=int, help=f"Write OUT/model.pt every N steps [{DEFAULTS['ckpt_every']}].")
@_opt("--log-every", type=int, help=f"Log loss and img/s every N steps [{DEFAULTS['log_every']}].")
@_opt("--seed", type=int, help="Seed of the weights, data order and noise, 0 .. 2^64-1 [0].")
@click.option("--resume", is_flag=True, help="Continue OUT/model.pt (to --steps total). Without it, an existing "
              "OUT/model.pt is refused, never replaced.")
@_opt("--device", help="auto, cpu or cuda [auto].")
@_opt("--workers", type=int, help="Threads decoding an image folder [0].")
@_opt("--threads", type=int, help="torch CPU threads (0 = torch's default) [0].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(data, out, resume, quiet, **options):
    """Train a Blurring Diffusion Model (Hoogeboom & Salimans 2022)."""
    path = train(data, out, resume=resume, progress=not quiet, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(path)


def main(args=None):
    """Console entry point ``bdm-train``."""
    run_cli(cli, args, prog_name="bdm-train")


if __name__ == "__main__":
    main()
