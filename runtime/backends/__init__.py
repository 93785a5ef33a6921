"""Inference backends: each runs the whole reverse loop of one chunk with the latent on its device.

A backend is created by :func:`bdm_runtime.sampler.load` and driven by :class:`bdm_runtime.sampler.Sampler`,
which owns the noise protocol (``bdm_runtime.noise``). Its interface:

``name``, ``provider``           what actually runs (e.g. ``"ort"``, ``"CPUExecutionProvider"``)
``device``                       ``"cpu"`` or ``"cuda"``: where the latent lives during the loop
``max_batch``                    the largest chunk it runs in one go (a TensorRT profile's maximum)
``run(z, times, eta, noise, labels, guidance, out, on_step)``
                                 ``z`` the initial latent, float32 ``[b, C, H, W]`` on the host;
                                 ``times`` the grid of ``bdm_runtime.noise.time_grid``; ``noise()`` returns
                                 the next draw (host) or is ``None`` when ``eta = 0``; ``labels`` int64
                                 ``[b]`` or ``None``; ``guidance`` a float or ``None``; ``out`` a numpy
                                 view ``[b, C, H, W]`` or a :class:`DeviceOut`; ``on_step()`` after each step
``close()``                      release sessions, engines and device memory

Modules here import their inference library when a model is loaded, never at ``import bdm_runtime``.
"""


class DeviceOut:
    """Caller-owned device memory for ``shape`` float32 values at ``ptr`` (from ``__cuda_array_interface__``).

    ``stream``: the producer's CUDA stream (CAI v3) that a consumer must synchronise with before
    writing, as a handle (1 and 2 are CUDA's legacy and per-thread default streams), or ``None``.
    """

    def __init__(self, ptr, shape, stream=None):
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.stream = stream

    def rows(self, start, count):
        """The part holding images ``start .. start + count - 1`` (C-contiguous float32)."""
        per_image = 4
        for d in self.shape[1:]:
            per_image *= d
        return DeviceOut(self.ptr + start * per_image, (count,) + self.shape[1:], self.stream)

    @property
    def nbytes(self):
        n = 4
        for d in self.shape:
            n *= d
        return n


def cuda_array(obj, shape):
    """``DeviceOut`` for an object exposing ``__cuda_array_interface__`` (float32, C-contiguous, ``shape``)."""
    from ..errors import BdmError

    cai = obj.__cuda_array_interface__
    got = tuple(int(d) for d in cai["shape"])
    if got != tuple(shape):
        raise BdmError(f"out has shape {got}, expected {tuple(shape)}")
    if cai.get("typestr") != "<f4":
        raise BdmError(f"out must be float32 ('<f4'), got {cai.get('typestr')!r}")
    strides = cai.get("strides")
    if strides is not None:
        expected, step = [], 4
        for d in reversed(got):
            expected.insert(0, step)
            step *= d
        if tuple(strides) != tuple(expected):
            raise BdmError("out must be C-contiguous device memory")
    ptr, readonly = cai["data"]
    if readonly:
        raise BdmError("out is read-only device memory")
    if cai.get("mask") is not None:
        raise BdmError("out has a mask (__cuda_array_interface__ 'mask'): pass plain device memory")
    stream = cai.get("stream")  # CAI v3: None = no synchronisation needed; 0 is disallowed
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int) or stream <= 0):
        raise BdmError(f"out has __cuda_array_interface__ stream {stream!r}: CAI v3 allows None or a "
                       "positive stream handle (1: legacy default stream, 2: per-thread default stream)")
    return DeviceOut(ptr, got, stream)
