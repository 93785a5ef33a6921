"""ONNX Runtime backend: the step graph in an ``InferenceSession``, the loop through I/O binding.

The latent lives in two device buffers that swap roles every step (``z_next`` of step ``i`` is
bound as ``z`` of step ``i + 1``), so it never visits the host during the loop: per step only
``t``, ``s`` and, when ``eta > 0``, the noise go up, and ``x0`` comes back once, after the last
step. On the CPU provider the same code runs with device ``"cpu"``.
"""
import numpy as np

from .. import format as fmt
from ..errors import BdmError
from . import DeviceOut

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BdmError("ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu), "
                       "or use TensorRT: --backend trt (builds and caches an engine from the .onnx)")
    return onnxruntime


def default_providers(ort, cuda_stream=None):
    """CUDA when this ONNX Runtime build has it (on ``cuda_stream`` if given), then CPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ["CPUExecutionProvider"]
    cuda = {}
    if cuda_stream is not None:  # documented CUDA EP options: run on the caller's stream
        cuda = {"has_user_compute_stream": "1", "user_compute_stream": str(int(cuda_stream))}
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


class OrtBackend:
    """Runs a bdm step graph (``.onnx``) with ONNX Runtime."""

    name = "ort"

    def __init__(self, path, info, providers=None, batch=None, cuda_stream=None, threads=None):
        ort = _import_ort()
        self._ort = ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only: the CLI prints one line, not ORT's warnings
        if providers is None:
            providers = default_providers(ort, cuda_stream)
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BdmError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}")
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider in _GPU_PROVIDERS else "cpu"
        options = self.session.get_provider_options().get(self.provider, {})
        self.device_id = int(options.get("device_id", 0) or 0)
        names = [i.name for i in self.session.get_inputs()]
        self.inputs = set(names)
        missing = [n for n in fmt.INPUTS if n not in self.inputs]
        if missing:
            raise BdmError(f"{path}: not a bdm step graph: inputs {missing} missing")
        self.max_batch = None  # dynamic batch: any chunk size
        self._buffers = {}

    # -- buffers --------------------------------------------------------------------------------
    def _ov(self, array):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _empty(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def _buffers_for(self, b, shape):
        """Device buffers for chunks of ``b`` images (kept for the next chunk of the same size)."""
        if b not in self._buffers:
            if len(self._buffers) > 1:  # at most two sizes live: the full chunk and the last one
                self._buffers.pop(next(iter(self._buffers)))
            img = (b,) + tuple(shape)
            self._buffers[b] = {
                "z0": self._empty(img, np.float32),  # z0 and z1 swap roles every step
                "z1": self._empty(img, np.float32),
                fmt.X0: self._empty(img, np.float32),
                fmt.T: self._empty((b,), np.float32),
                fmt.S: self._empty((b,), np.float32),
                fmt.NOISE: self._empty(img, np.float32),
                fmt.ETA: self._empty((1,), np.float32),
                fmt.LABEL: self._empty((b,), np.int64),
                fmt.GUIDANCE: self._empty((1,), np.float32),
            }
        return self._buffers[b]

    def _put(self, bufs, name, array):
        """Copy a host array into the device buffer ``name`` (same address: bindings stay valid)."""
        array = np.ascontiguousarray(array)
        ov = bufs[name]
        if hasattr(ov, "update_inplace"):  # ONNX Runtime >= 1.16
            ov.update_inplace(array)
        else:
            bufs[name] = self._ov(array)

    def _binding(self, bufs, parity, x0=None):
        """An I/O binding reading ``z`` from buffer ``parity`` and writing ``z_next`` to the other."""
        io = self.session.io_binding()
        io.bind_ortvalue_input(fmt.Z, bufs["z%d" % parity])
        for name in (fmt.T, fmt.S, fmt.ETA, fmt.NOISE, fmt.LABEL, fmt.GUIDANCE):
            if name in self.inputs:
                io.bind_ortvalue_input(name, bufs[name])
        io.bind_ortvalue_output(fmt.Z_NEXT, bufs["z%d" % (1 - parity)])
        if isinstance(x0, DeviceOut):  # the caller's device memory receives the last x0 directly
            io.bind_output(fmt.X0, "cuda", self.device_id, np.float32, list(x0.shape), x0.ptr)
        else:
            io.bind_ortvalue_output(fmt.X0, bufs[fmt.X0])
        return io

    # -- the loop -------------------------------------------------------------------------------
    def run(self, z, times, eta, noise, labels, guidance, out, on_step=None):
        """Run all steps of ``times`` on one chunk and write the final ``x0`` into ``out``."""
        if isinstance(out, DeviceOut) and self.device != "cuda":
            raise BdmError("out is device memory, but ONNX Runtime runs on the CPU here: pass a numpy array")
        b = z.shape[0]
        bufs = self._buffers_for(b, z.shape[1:])
        self._put(bufs, "z0", z)
        self._put(bufs, fmt.ETA, np.array([eta], dtype=np.float32))
        if noise is None:  # eta = 0: the graph multiplies the noise by 0; feed zeros once
            self._put(bufs, fmt.NOISE, np.zeros(z.shape, dtype=np.float32))
        if fmt.LABEL in self.inputs:
            self._put(bufs, fmt.LABEL, np.asarray(labels, dtype=np.int64))
        if fmt.GUIDANCE in self.inputs:
            self._put(bufs, fmt.GUIDANCE, np.array([guidance or 0.0], dtype=np.float32))
        steps = len(times) - 1
        # With update_inplace the buffers keep their addresses, so two bindings serve every step.
        inplace = hasattr(bufs[fmt.T], "update_inplace")
        ios = [self._binding(bufs, 0), self._binding(bufs, 1)] if inplace else None
        for i in range(steps):
            self._put(bufs, fmt.T, np.full((b,), times[i], dtype=np.float32))
            self._put(bufs, fmt.S, np.full((b,), times[i + 1], dtype=np.float32))
            if noise is not None:
                self._put(bufs, fmt.NOISE, noise())
            last = i == steps - 1
            if ios is None or (last and isinstance(out, DeviceOut)):
                io = self._binding(bufs, i % 2, out if last else None)
            else:
                io = ios[i % 2]
            self.session.run_with_iobinding(io)
            if on_step is not None:
                on_step()
        if not isinstance(out, DeviceOut):
            out[...] = bufs[fmt.X0].numpy()

    def close(self):
        """Drop the session and its buffers."""
        self._buffers = {}
        self.session = None
