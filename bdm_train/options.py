"""``bdm-train``'s options: defaults, types and ranges, and how a resumed run combines them.

One definition for the CLI and the Python API (``train(data, out, **options)``): an option left
out is ``None``, so a resumed run keeps the value stored in its checkpoint, unless the option
defines the network or the data (``FIXED``: refused), or changes the trajectory (``TRAJECTORY``:
allowed, with a note that the run no longer equals an uninterrupted one).
"""
import sys

import numpy as np

from bdm_runtime.errors import BdmError
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
    device="auto", workers=0, threads=0, precision="auto",
)
# The network's arithmetic in training: float32, or bfloat16 autocast (the loss, the forward process B5,
# the optimiser and the EMA weights stay float32). "auto": bf16 on CUDA and on CPUs with BF16 units
# (AMX / AVX512-BF16), float32 elsewhere; a run stores the precision it resolved to, so --resume keeps it.
PRECISIONS = ("auto", "fp32", "bf16")
SEED_MAX = 2 ** 64 - 1  # torch.manual_seed takes 0 .. 2^64 - 1
# Options that define the network or the data: a resumed run cannot change them.
FIXED = ("image_size", "fit", "ch", "ch_mult", "num_res_blocks", "attn", "blur_sigma_max", "min_scale",
         "num_classes", "param")
# B14's data statistics come from a fixed, seeded subset of at most this many training images.
STATS_IMAGES = 10000
# Options that change the trajectory: a resumed run may change them, but then it no longer equals
# an uninterrupted run (we say so).
TRAJECTORY = ("batch_size", "lr", "warmup", "grad_clip", "weight_decay", "ema_decay", "p_uncond", "flip",
              "seed", "dropout")   # and precision, compared once resolved (train.py)



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
        (o["fit"] is None or o["image_size"] is not None,
         f"--fit {o['fit']} needs --image-size (the size to fit the images to); without it the data's own is used"),
        (o["log_every"] >= 1, "--log-every must be >= 1"),
        (o["sample_n"] >= 1, "--sample-n must be >= 1"),
        (o["ckpt_every"] >= 0, "--ckpt-every must be >= 0 (0 = only at the end)"),
        (o["sample_every"] >= 0, "--sample-every must be >= 0 (0 = never)"),
        (valid_device(o["device"]), f"--device must be auto, cpu, cuda or cuda:N, got {o['device']!r}"),
        (o["precision"] in PRECISIONS + ("legacy",), f"--precision must be one of {', '.join(PRECISIONS)}, got {o['precision']!r}"),
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
        # checkpoints from before B14 are eps models; from before --precision, bf16 on CUDA only
        opts.update({"param": "eps", "precision": "legacy"}, **stored)
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


def resolve_precision(precision, device):
    """The precision a run on ``device`` trains in: ``fp32`` or ``bf16`` (see ``PRECISIONS``).

    ``legacy`` (a checkpoint from before the option) does what those runs did: bf16 on CUDA, float32 on CPU.
    """
    from bdm_runtime.cpu import native_bf16

    if precision in ("fp32", "bf16"):
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if precision == "auto" and native_bf16() else "fp32"
