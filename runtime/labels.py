"""Class labels: one rule for every sampler (torch or not) and every ``--label`` option.

A conditional model with ``K`` classes takes labels ``0 .. K - 1``; ``K`` itself is the null
label (unconditional sampling, B12). Labels are whole numbers: ``1.5`` is refused, never truncated.
"""
import numpy as np

from .errors import BdmError


def normalize_labels(labels, n, num_classes, error=BdmError):
    """One int64 label per image (``[n]``), or ``None`` for an unconditional model; raises ``error``.

    ``labels``: ``None`` (the null label ``num_classes`` for every image), one label for all
    images, or ``n`` labels, each an integer in ``[0, num_classes]``.
    """
    if num_classes <= 0:
        if labels is not None:
            raise error("labels given, but the model is unconditional")
        return None
    if labels is None:  # the null label: unconditional sampling (B12)
        return np.full((n,), num_classes, dtype=np.int64)
    arr = np.asarray(labels)
    if arr.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                                     for v in arr.reshape(-1)):  # whole numbers too large for int64
        values = [int(v) for v in arr.reshape(-1)]
        raise error(_out_of_range(num_classes, min(values), max(values)))
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > num_classes:  # before int64 wraps them around
        raise error(_out_of_range(num_classes, int(arr.min()), int(arr.max())))
    whole = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr)))
                                       and bool(np.all(arr == np.round(arr))))
    if not whole:
        raise error(f"labels must be integers, got {labels!r}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size == 1:
        arr = np.full((n,), arr[0], dtype=np.int64)
    if arr.size != n:
        raise error(f"need 1 or n={n} labels, got {arr.size}")
    if arr.min() < 0 or arr.max() > num_classes:
        raise error(_out_of_range(num_classes, int(arr.min()), int(arr.max())))
    return arr


def _out_of_range(num_classes, lo, hi):
    return f"labels must be in 0..{num_classes - 1} ({num_classes} is the null label), got {lo}..{hi}"


def parse_labels(text, flag="--label"):
    """A ``--label`` value, ``"3"`` or ``"0,1,2"``, as a list of ints (``None`` stays ``None``); ``BdmError`` if bad."""
    if text is None:
        return None
    try:
        labels = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        labels = []
    if not labels:
        raise BdmError(f"{flag} must be an integer or a comma-separated list of integers, got {text!r}")
    return labels
