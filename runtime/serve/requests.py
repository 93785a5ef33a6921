"""A batch of Triton requests in, one response (or one refusal) per request out: numpy only.

Every input is per row, shape ``[rows, 1]``; one row is one image: ``seed`` and ``index`` pick it
in the noise protocol (``bdm_runtime.noise``), the optional inputs set its sampler (``steps``,
``solver``, ``grid``, ``eta``, ``guidance``), its class (``label``) and whether the float32
``sample`` comes back beside the uint8 ``image``. Rows of the whole batch that share sampler settings
run as one call of :meth:`bdm_runtime.sampler.Sampler.sample_images` (chunked by the sampler's
batch), so an image is the same whichever requests it was batched with, and equals ``bdm-run``'s.

A request whose values are refused gets a :class:`BdmError` naming the input; the others still run.
"""
import math
from collections import OrderedDict

import numpy as np

from ..errors import BdmError
from ..grids import GRIDS, SOLVERS
from ..images import to_uint8
from ..limits import check_sample_memory

# (name, numpy dtype, Triton dtype, optional): every input has one value per row (shape [rows, 1]).
INPUTS = (
    ("seed", np.int64, "TYPE_INT64", False),
    ("index", np.int64, "TYPE_INT64", False),
    ("steps", np.int32, "TYPE_INT32", True),
    ("solver", np.bytes_, "TYPE_STRING", True),
    ("grid", np.bytes_, "TYPE_STRING", True),
    ("eta", np.float32, "TYPE_FP32", True),
    ("label", np.int64, "TYPE_INT64", True),
    ("guidance", np.float32, "TYPE_FP32", True),
    ("float_output", np.bool_, "TYPE_BOOL", True),
)
SETTINGS = ("steps", "solver", "grid", "eta", "guidance")  # rows that share these run as one call
IMAGE, SAMPLE = "image", "sample"


def outputs(image_shape):
    """``(name, numpy dtype, Triton dtype, per-row shape)`` of the outputs for images ``(C, H, W)``."""
    c, h, w = image_shape
    return ((IMAGE, np.uint8, "TYPE_UINT8", (h, w, c)), (SAMPLE, np.float32, "TYPE_FP32", (c, h, w)))


class Row:
    """One image of a request: its noise ``(seed, index)``, label (or ``None``) and sampler settings."""

    __slots__ = ("seed", "index", "label", "key")

    def __init__(self, seed, index, label, key):
        self.seed, self.index, self.label, self.key = seed, index, label, key


def _column(inputs, name, dtype, rows):
    """Input ``name`` as a flat array of ``rows`` values, or ``None`` where the request left it out."""
    value = inputs.get(name)
    if value is None:
        return None
    value = np.asarray(value)
    if value.shape not in ((rows, 1), (rows,)):
        raise BdmError(f"input '{name}': shape must be [{rows}, 1] (one value per row), got {list(value.shape)}")
    kind = np.dtype(dtype).kind
    if (value.dtype.kind in "OSU") != (kind == "S") or (kind != "S" and value.dtype != dtype):
        raise BdmError(f"input '{name}': data type must be {np.dtype(dtype).name}, got {value.dtype.name}")
    return value.reshape(rows)


def _text(value, name, choices):
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if text not in choices:
        raise BdmError(f"input '{name}': must be one of {', '.join(choices)}, got {text!r}")
    return text


def _number(value, name, low, high=None):
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f"finite and >= {low}"
        raise BdmError(f"input '{name}': must be {bound}, got {v!r}")
    return v


def _row_key(cols, r, max_steps):
    """The sampler settings of row ``r`` (``None``: the model's default), each checked."""
    steps, solver, grid, eta, guidance = (cols[k] for k in SETTINGS)
    s = None if steps is None else int(steps[r])
    if s is not None and not 1 <= s <= max_steps:
        raise BdmError(f"input 'steps': must be in 1..{max_steps} (this server's --max-steps), got {s}")
    return (s,
            None if solver is None else _text(solver[r], "solver", SOLVERS),
            None if grid is None else _text(grid[r], "grid", GRIDS),
            None if eta is None else _number(eta[r], "eta", 0.0, 1.0),
            None if guidance is None else _number(guidance[r], "guidance", 0.0))


def _check_guidance(info, key):
    """Refuse a guidance weight the graph cannot apply (B12 needs a conditional graph with the guided branch)."""
    if key[4]:
        if info.num_classes <= 0:
            raise BdmError("input 'guidance': this model is unconditional; send no guidance")
        if not info.guided:
            raise BdmError("input 'guidance': this graph was exported without the guided branch")


def _check_label(labels, r, num_classes, key):
    if labels is None:
        if key[4]:  # guidance without a label: every image would get the null label, where w does nothing
            raise BdmError("input 'guidance': needs a label per row (B12: the null label ignores guidance)")
        return None
    if num_classes <= 0:
        raise BdmError("input 'label': this model is unconditional; send no label")
    lab = int(labels[r])
    if not 0 <= lab <= num_classes:
        raise BdmError(f"input 'label': must be in 0..{num_classes - 1} ({num_classes} is the null label), got {lab}")
    return lab


def parse(inputs, sampler, max_rows, max_steps, plans):
    """The rows of one request (``inputs``: name -> array), every value checked; ``BdmError`` names the input.

    ``plans`` caches, per settings key, the sampler's own verdict (``Sampler.plan``), so that a
    setting the model cannot run (a solver its graph lacks) is refused per request, before sampling.
    """
    unknown = sorted(set(inputs) - {name for name, *_ in INPUTS})
    if unknown:
        raise BdmError(f"input '{unknown[0]}': not an input of this model (inputs: {', '.join(n for n, *_ in INPUTS)})")
    if inputs.get("seed") is None or inputs.get("index") is None:
        raise BdmError(f"input '{'seed' if inputs.get('seed') is None else 'index'}': required")
    rows = int(np.asarray(inputs["seed"]).shape[0]) if np.ndim(inputs["seed"]) else 0
    if not 1 <= rows <= max_rows:
        raise BdmError(f"input 'seed': {rows} rows (images); this server takes 1..{max_rows} per request")
    cols = {name: _column(inputs, name, dtype, rows) for name, dtype, _, _ in INPUTS}
    for name in ("seed", "index"):
        if cols[name].min() < 0:
            raise BdmError(f"input '{name}': must be >= 0, got {int(cols[name].min())}")
    out = []
    for r in range(rows):
        key = _row_key(cols, r, max_steps)
        if key not in plans:
            try:
                sampler.plan(steps=key[0], eta=key[3], solver=key[1], grid=key[2])
            except BdmError as e:
                raise BdmError(f"inputs {', '.join(SETTINGS[:4])}: {e}")
            _check_guidance(sampler.info, key)
            plans[key] = True
        label = _check_label(cols["label"], r, sampler.num_classes, key)
        out.append(Row(int(cols["seed"][r]), int(cols["index"][r]), label, key))
    floats = cols["float_output"]
    return out, bool(floats is not None and floats.any())


def check(sampler, requests, max_rows, max_steps):
    """``(parsed, errors)`` of a batch: ``(i, rows, floats)`` per accepted request, ``{i: BdmError}`` per refused."""
    plans, parsed, errors = {}, [], {}
    for i, inputs in enumerate(requests):
        try:
            parsed.append((i,) + parse(inputs, sampler, max_rows, max_steps, plans))
        except BdmError as e:
            errors[i] = e
    return parsed, errors


def respond(sampler, parsed, n):
    """The outputs of the accepted requests ``parsed`` of a batch of ``n``: a list with ``None`` elsewhere.

    Rows of all of them are grouped by their settings (first-seen order); each group is one
    ``sample_images`` call. Memory is checked for the whole batch before anything is allocated.
    """
    results = [None] * n
    rows = [row for _, rs, _ in parsed for row in rs]
    if not rows:
        return results
    check_sample_memory(len(rows), sampler.image_shape, min(len(rows), sampler.batch))
    x = _sample_groups(sampler, rows)
    start = 0
    for i, rs, floats in parsed:
        part = x[start:start + len(rs)]
        start += len(rs)
        # copies with plain strides: to_uint8's view has a size-1 axis of any stride, which Triton's
        # Python backend misreads ("output tensor shape does not match size of output")
        results[i] = {IMAGE: to_uint8(part).copy()}
        if floats:
            results[i][SAMPLE] = part.copy()
    return results


def run(sampler, requests, max_rows, max_steps):
    """One result per request of a batch: a dict of outputs, or the :class:`BdmError` that refused it."""
    parsed, errors = check(sampler, requests, max_rows, max_steps)
    results = respond(sampler, parsed, len(requests))
    for i, e in errors.items():
        results[i] = e
    return results


def _sample_groups(sampler, rows):
    """Float32 images ``[len(rows), C, H, W]`` in row order; one ``sample_images`` call per settings key."""
    groups = OrderedDict()
    for k, row in enumerate(rows):
        groups.setdefault(row.key, []).append(k)
    x = np.empty((len(rows),) + tuple(sampler.image_shape), dtype=np.float32)
    null = sampler.num_classes
    for key, ks in groups.items():
        steps, solver, grid, eta, guidance = key
        members = [rows[k] for k in ks]
        labels = None
        if any(row.label is not None for row in members):
            labels = [null if row.label is None else row.label for row in members]
        x[ks] = sampler.sample_images([row.seed for row in members], [row.index for row in members], steps=steps,
                                      eta=eta, labels=labels, guidance=guidance, solver=solver, grid=grid)
    return x
