"""The noise protocol: the reproducibility contract every backend follows.

Image ``i`` of a call with seed ``S`` has its own generator ``numpy.random.default_rng([S, i])``.
Its first draw, ``standard_normal((C, H, W), float32)``, is the initial latent ``z_1``; then, only
when ``eta > 0``, one more draw of the same shape per step, in step order, is ``xi`` (frequency
space) of that step. An image therefore depends only on ``(S, i)``: the same on every backend, at
any batch size or chunking, or split across processes (``first_index``).
"""
import numpy as np

from .errors import BdmError


def check_positive_int(v, name, error=BdmError):
    """``int(v)`` if ``v`` is an integer >= 1 (not a bool), else raise ``error`` naming ``name``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise error(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def check_seed(seed, first_index=0):
    """Raise ``BdmError`` (a ``ValueError``) unless ``seed`` and ``first_index`` are non-negative integers."""
    for name, v in (("seed", seed), ("first_index", first_index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise BdmError(f"{name} must be a non-negative integer, got {v!r}")


class NoiseStream:
    """Per-image generators for images ``first_index .. first_index + n - 1`` of seed ``seed``."""

    def __init__(self, seed, first_index, n, shape):
        check_seed(seed, first_index)
        self.shape = tuple(int(d) for d in shape)
        self.generators = [np.random.default_rng([int(seed), int(first_index) + i]) for i in range(n)]

    @classmethod
    def of_images(cls, seeds, indices, shape):
        """Generators for images ``(seeds[k], indices[k])``: any mix of seeds and indices in one chunk.

        Each image still has its own ``default_rng([S, i])``, so it comes out exactly as in a call
        with seed ``S`` that covers index ``i`` (what lets a server merge requests into one batch).
        """
        if len(seeds) != len(indices) or not len(seeds):
            raise BdmError(f"need as many seeds as indices (at least one), got {len(seeds)} and {len(indices)}")
        stream = cls(0, 0, 0, shape)
        for seed, index in zip(seeds, indices):
            check_seed(seed, index)
        stream.generators = [np.random.default_rng([int(s), int(i)]) for s, i in zip(seeds, indices)]
        return stream

    def draw(self, out=None):
        """The next draw of every image, stacked: float32 ``[n, *shape]`` (written into ``out`` if given)."""
        if out is None:
            out = np.empty((len(self.generators),) + self.shape, dtype=np.float32)
        for g, o in zip(self.generators, out):
            g.standard_normal(self.shape, dtype=np.float32, out=o)
        return out


def time_grid(steps):
    """``t_i = i / steps`` for ``i = steps .. 0`` as float32: ``steps`` steps ``(t_i, t_{i-1})``."""
    steps = check_positive_int(steps, "steps")
    return np.array([i / steps for i in range(steps, -1, -1)], dtype=np.float32)
