"""The reverse loop of one chunk: the same for every backend, which differ only in upload, step and download.

Per chunk the loop uploads the initial latent, the constant inputs and the time grid (with
``t_prev`` for format-2 graphs) once; per step the backend selects that step's times (on the
device where it can) and only the noise, when ``eta > 0``, goes up. The latent and
B11's state (``u_x``) stay on the backend's device in two buffers that swap roles every step
(step ``i`` reads buffer ``i % 2`` and writes the other), so a step is always the same two
bindings: ONNX Runtime reuses them, TensorRT can replay each as a captured CUDA graph.

The backend interface (``prepare``, ``upload``, ``set_times``, ``select``, ``step``,
``synchronize``, ``download``) is documented in ``bdm_runtime.backends``.
"""
import time

import numpy as np

from . import format as fmt


class Plan:
    """What a chunk's loop feeds besides the latent: times, ``t_prev`` (B11's history), eta."""

    def __init__(self, times, t_prev, eta, stateful):
        self.times = np.asarray(times, dtype=np.float32)
        self.t_prev = np.asarray(t_prev, dtype=np.float32)
        self.eta = float(eta)
        self.stateful = bool(stateful)   # a format-2 graph: feed t_prev and u_x_prev

    @property
    def steps(self):
        return len(self.times) - 1


def run_chunk(backend, z, plan, noise, labels, guidance, out, on_step=None, timing=None):
    """All steps of ``plan`` on one chunk with initial latent ``z``; the last ``x0`` into ``out``.

    ``noise()`` returns the next ``xi`` (host) or is ``None`` (``eta = 0``: zeros are uploaded
    once). ``timing(seconds)`` receives each step's own time (the backend is synchronised before
    and after it, so on an asynchronous backend timing removes the overlap of host and device).
    """
    b = z.shape[0]
    backend.prepare(b)
    backend.upload(fmt.Z, z)
    backend.upload(fmt.ETA, np.array([plan.eta], dtype=np.float32))
    if noise is None:  # eta = 0: the graph multiplies the noise by 0
        backend.upload(fmt.NOISE, np.zeros(z.shape, dtype=np.float32))
    if plan.stateful:  # read only where t_prev > t; zeros keep whatever was there out of the step
        backend.upload(fmt.U_X_PREV, np.zeros(z.shape, dtype=np.float32))
    if labels is not None:
        backend.upload(fmt.LABEL, np.asarray(labels, dtype=np.int64))
    if guidance is not None:
        backend.upload(fmt.GUIDANCE, np.array([guidance], dtype=np.float32))
    backend.set_times(plan.times, plan.t_prev if plan.stateful else None)
    for i in range(plan.steps):
        backend.select(i)
        if noise is not None:
            backend.upload(fmt.NOISE, noise())
        last = out if i == plan.steps - 1 else None
        if timing is None:
            backend.step(i % 2, last)
        else:
            backend.synchronize()
            start = time.perf_counter()
            backend.step(i % 2, last)
            backend.synchronize()
            timing(time.perf_counter() - start)
        if on_step is not None:
            on_step()
    backend.download(out)
