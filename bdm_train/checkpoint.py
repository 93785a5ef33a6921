"""Checkpoints: one versioned dict of tensors and plain types, loadable with ``weights_only=True``.

Schema (version 1)::

    {"format": "bdm.checkpoint", "version": 1, "step": int,
     "config": {"model": UNet kwargs, "process": BlurringDiffusion config,
                "sampler": {"clip_denoised", "steps", "eta"}, "train": {...}, "data": {...}},
     "model": state_dict, "ema": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "rng": {"torch": uint8 tensor, "cuda": [uint8 tensor, ...], "numpy": [...], "python": [...]}}
"""
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from bdm_runtime.errors import BdmError
from bdm_runtime.io import atomic_path
from bdm_runtime.limits import MAX_STEPS

FORMAT = "bdm.checkpoint"
VERSION = 1
REQUIRED = ("config", "model", "ema", "step")


# -- RNG states as tensors and plain types --------------------------------------------------------
def rng_state():
    """Global RNG states of torch (CPU, CUDA), numpy and Python, as tensors and plain types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state):
    """Restore what :func:`rng_state` returned (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- save ---------------------------------------------------------------------------------------
def save(path, config, model, ema, step, optimizer=None, scheduler=None, rng=None, extra=None):
    """Write a checkpoint atomically (temporary file beside ``path``, then ``os.replace``); ``extra``: more
    top-level entries (tensors and plain types)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "model": _cpu(model.state_dict()),
        "ema": _cpu(ema.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng if rng is not None else rng_state(),
        "step": int(step),
    }
    state.update(extra or {})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _write(state, path)
    return path


def _write(state, path):
    """``torch.save`` atomically; a full disk (or any write failure) is one line naming ``path``."""
    existed = os.path.exists(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # through a file object: the archive's inner folder is "archive", not the
            # temporary file's name, so the same state writes the same bytes (a release's sha256 is reproducible)
    except (OSError, RuntimeError) as e:  # torch's writer raises RuntimeError("... file write failed")
        reason = getattr(e, "strerror", None) or "the write failed"  # torch's own text is internal detail
        kept = "the previous checkpoint is unchanged" if existed else "nothing was written"
        raise BdmError(f"cannot write checkpoint {path}: {reason} (is the disk full?); {kept}") from None


def release(src, dst, sampler=None):
    """A sampling-only copy of checkpoint ``src`` at ``dst``: EMA weights, no optimizer or RNG state.

    ``sampler`` updates ``config["sampler"]`` (``steps``, ``eta``, ``clip_denoised``): the defaults
    ``bdm-export`` stores in the graph. The copy loads everywhere a checkpoint does but cannot be resumed.
    """
    state = load_state(src)
    config = dict(state["config"], sampler=dict(state["config"]["sampler"], **(sampler or {})))
    out = {"format": FORMAT, "version": VERSION, "config": config, "model": state["ema"], "ema": state["ema"],
           "optimizer": None, "scheduler": None, "rng": None, "step": int(state["step"]), "release": True}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    _write(out, dst)
    return dst


def _cpu(state_dict):
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


# -- load ---------------------------------------------------------------------------------------
def load_state(path, map_location="cpu"):
    """The raw checkpoint dict, validated; :class:`BdmError` naming the file for anything not ours."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "model.pt")
        hint = f": give {inside}" if os.path.isfile(inside) else ": give the model.pt file of a run"
        raise BdmError(f"checkpoint {path} is a folder{hint}")
    if not os.path.isfile(path):
        raise BdmError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise BdmError(f"cannot read checkpoint {path}: not a torch checkpoint (truncated, or another kind of file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise BdmError(f"cannot read checkpoint {path}: it holds pickled Python objects, which bdm never loads "
                       "(a bdm checkpoint has only tensors and plain types)") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError,
            KeyError, AttributeError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BdmError(f"cannot read checkpoint {path} (truncated or not a torch file): {first[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BdmError(f"{path} is not a bdm checkpoint (no format {FORMAT!r})")
    version = state.get("version")
    if not isinstance(version, int) or version < 1:
        raise BdmError(f"{path}: bad checkpoint version {version!r}")
    if version > VERSION:
        raise BdmError(f"{path} is checkpoint version {version}, newer than this bdm reads ({VERSION}): "
                       f"upgrade bdm")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise BdmError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not isinstance(state["config"], dict):
        raise BdmError(f"{path}: checkpoint config is a {type(state['config']).__name__}, not a dict")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise BdmError(f"{path}: bad checkpoint step {state['step']!r}")
    for key in ("model", "process", "sampler"):
        if not isinstance(state["config"].get(key), dict):
            raise BdmError(f"{path}: checkpoint config lacks {key!r}")
    return state


def sampler_settings(config, path, steps=None, eta=None, clip_denoised=None):
    """``(steps, eta, clip_denoised)``: the given values, else the checkpoint's sampler config; checked.

    A bad value says where it came from: the option, or the checkpoint (which a user did not type).
    """
    stored = config["sampler"]
    steps_from = "--steps" if steps is not None else f"{path}: its stored sampler steps"
    eta_from = "--eta" if eta is not None else f"{path}: its stored sampler eta"
    steps = stored.get("steps") if steps is None else steps
    eta = stored.get("eta") if eta is None else eta
    clip_denoised = stored.get("clip_denoised", True) if clip_denoised is None else clip_denoised
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise BdmError(f"{steps_from} {steps!r} is not in 1..{MAX_STEPS}"
                       + ("" if steps_from == "--steps" else ": give --steps"))
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise BdmError(f"{eta_from} {eta!r} is not in [0, 1]" + ("" if eta_from == "--eta" else ": give --eta"))
    if not isinstance(clip_denoised, bool):
        raise BdmError(f"{path}: its stored clip_denoised {clip_denoised!r} is not true/false: give --clip or --no-clip")
    return steps, float(eta), clip_denoised


def build(config):
    """``(UNet, BlurringDiffusion)`` from a checkpoint config (fresh weights)."""
    from .diffusion import BlurringDiffusion
    from .unet import UNet

    return UNet(**config["model"]), BlurringDiffusion.from_config(config["process"])


def check_device(device):
    """``device`` as a ``torch.device`` this machine has (cpu, cuda, cuda:N); :class:`BdmError` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BdmError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise BdmError(f"--device {device}, but this torch sees {count} CUDA device(s)")
    return dev


def weight_mismatch(module, weights):
    """What keeps ``weights`` from loading into ``module``, naming the weights and shapes, or ``None``."""
    if not isinstance(weights, dict):
        return f"its weights are a {type(weights).__name__}, not a dict of tensors"
    own = module.state_dict()
    for name, value in weights.items():
        if name in own and (not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[name].shape)):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"weight {name} has shape {shape}, its config's network needs {list(own[name].shape)}"
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    if missing or extra:
        what = f"lacks weight {missing[0]}" if missing else f"has weight {extra[0]}, which its config's network lacks"
        more = len(missing) + len(extra) - 1
        return what + (f" (and {more} more mismatched name(s))" if more else "")
    return None


def load_weights(module, weights, path):
    """``module.load_state_dict(weights)``; a mismatch is one line naming ``path``, the weight and the shapes."""
    problem = weight_mismatch(module, weights)
    if problem:
        raise BdmError(f"{path}: checkpoint does not match its config: {problem}")
    module.load_state_dict(weights)


def load(path, ema=True, device="cpu"):
    """``(model, process, config)`` in eval mode; ``ema=True`` takes the EMA weights (for sampling)."""
    device = check_device(device)  # before reading: a mistyped device costs no I/O
    state = load_state(path)
    config = state["config"]
    try:
        model, process = build(config)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BdmError(f"{path}: checkpoint does not match its config: {first[:200]}") from None
    load_weights(model, state["ema" if ema else "model"], path)
    return model.to(device).eval(), process.to(device), config
