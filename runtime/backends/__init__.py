"""Inference backends: each runs one step graph with the latent on its device, driven by ``bdm_runtime.loop``.

A backend is created by :func:`bdm_runtime.sampler.load`; :class:`bdm_runtime.sampler.Sampler` owns the
noise protocol (``bdm_runtime.noise``) and the plan (times, solver history, eta: ``bdm_runtime.grids``),
and ``bdm_runtime.loop.run_chunk`` is the one loop every backend shares. A backend only moves data
and runs steps:

``name``, ``provider``           what actually runs (e.g. ``"ort"``, ``"CPUExecutionProvider"``)
``device``                       ``"cpu"`` or ``"cuda"``: where the latent lives during the loop
``max_batch``                    the largest chunk it runs in one go (a TensorRT profile's maximum)
``prepare(b)``                   device buffers for a chunk of ``b`` images
``upload(name, array)``          a host array into graph input ``name`` (``z``, ``u_x_prev``: the state
                                 buffers of parity 0)
``set_times(times, t_prev)``     the chunk's time grid (``t_prev`` per step for format 2, else ``None``)
``select(i)``                    make step ``i``'s ``t``, ``s`` (``t_prev``) the inputs
``step(parity, out=None)``       one step reading the state buffers ``parity``, writing the others
                                 (``out``, the caller's destination, is passed on the last step)
``synchronize()``                wait for queued device work
``download(out)``                the last ``x0`` into ``out``: a numpy view ``[b, C, H, W]`` or a :class:`DeviceOut`
``close()``                      release sessions, engines and device memory

Modules here import their inference library when a model is loaded, never at ``import bdm_runtime``.
"""
import numpy as np

from .. import format as fmt


class HostTimes:
    """``set_times`` / ``select`` for backends whose time inputs are host arrays (ONNX Runtime, OpenVINO):
    the chunk's grid kept as host rows, one row per step, uploaded step by step through ``upload``."""

    def set_times(self, times, t_prev=None):
        """The chunk's grid as host rows (row ``i``: step ``i``'s value for every image)."""
        b = self._b
        self._times = np.repeat(np.asarray(times, np.float32)[:, None], b, axis=1)
        self._t_prev = None if t_prev is None else np.repeat(np.asarray(t_prev, np.float32)[:, None], b, axis=1)

    def select(self, i):
        """Step ``i``'s ``t``, ``s`` (and ``t_prev``) into the inputs."""
        self.upload(fmt.T, self._times[i])
        self.upload(fmt.S, self._times[i + 1])
        if self._t_prev is not None and fmt.T_PREV in self.inputs:
            self.upload(fmt.T_PREV, self._t_prev[i])


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
