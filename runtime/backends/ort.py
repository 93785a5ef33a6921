"""ONNX Runtime backend: the step graph in an ``InferenceSession``, steps through I/O binding.

Upload, step and download of the shared loop (``bdm_runtime.loop``): the latent (and a format-2
graph's ``u_x`` state) lives in two device buffers that swap roles every step (``z_next`` of step
``i`` is bound as ``z`` of step ``i + 1``), so it never visits the host during the loop; ``x0``
comes back once, after the last step. On the CPU provider the same code runs with device ``"cpu"``.
"""
import contextlib
import sys

import numpy as np

from .. import format as fmt
from ..errors import BdmError
from ..limits import out_of_memory
from . import DeviceOut, HostTimes

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


def step_error(path, error, batch, image_shape, symbolic):
    """A ``BdmError`` naming ``path`` and the fix for an ONNX Runtime failure inside a step that the user's
    request or file caused (memory for the batch; a graph that does not take its metadata's image shape),
    else ``None``."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if out_of_memory(error):
        return BdmError(f"{path}: ONNX Runtime ran out of memory in a step of {batch} images ({first}): "
                        "lower the batch (--batch, or batch= of load)")
    text = str(error).lower()
    if symbolic and any(w in text for w in ("dimension", "shape", "invalid")):
        shown = "x".join(map(str, image_shape))
        return BdmError(f"{path}: the graph does not run on {shown} images, the shape its metadata gives ({first}): "
                        "its metadata was altered; export it again")
    return None


class OrtBackend(HostTimes):
    """Runs a bdm step graph (``.onnx``) with ONNX Runtime.

    ``session_options``: an ``onnxruntime.SessionOptions`` used as given (``threads`` then does
    not apply); by default all graph optimisations, ``threads`` intra-op threads, errors-only logging.
    """

    name = "ort"

    def __init__(self, path, info, providers=None, batch=None, cuda_stream=None, threads=None,
                 session_options=None):
        ort = _import_ort()
        self._ort = ort
        opts = session_options
        if opts is None:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                opts.intra_op_num_threads = int(threads)
            opts.log_severity_level = 4  # fatal only: a failed step raises, and the CLI prints that as one line
        elif threads:
            raise BdmError("give threads or session_options, not both (set intra_op_num_threads on the options)")
        if providers is None:
            providers = default_providers(ort, cuda_stream)
        try:  # ORT prints its provider-fallback banner: to stderr, stdout is the caller's
            with contextlib.redirect_stdout(sys.stderr):
                self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BdmError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}")
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider in _GPU_PROVIDERS else "cpu"
        options = self.session.get_provider_options().get(self.provider, {})
        self.device_id = int(options.get("device_id", 0) or 0)
        names = [i.name for i in self.session.get_inputs()]
        self.inputs = set(names)
        missing = [n for n in fmt.inputs(info.format_version) if n not in self.inputs]
        if missing:
            raise BdmError(f"{path}: not a bdm step graph: inputs {missing} missing")
        self.stateful = fmt.U_X_PREV in self.inputs
        self._shape = tuple(info.image_shape)
        self._path, self._symbolic = path, info.symbolic
        self.max_batch = None  # dynamic batch: any chunk size
        self._buffers = {}
        self._bufs = self._ios = None

    @property
    def session_options(self):
        """The options the session really runs with, read back from ONNX Runtime."""
        return self.session.get_session_options()

    # -- buffers --------------------------------------------------------------------------------
    def _ov(self, array):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _empty(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def prepare(self, b):
        """Device buffers for chunks of ``b`` images (kept for the next chunk of the same size)."""
        if b not in self._buffers:
            if len(self._buffers) > 1:  # at most two sizes live: the full chunk and the last one
                self._buffers.pop(next(iter(self._buffers)))
            img = (b,) + self._shape
            bufs = {"z0": self._empty(img, np.float32), "z1": self._empty(img, np.float32),  # swap roles
                    fmt.X0: self._empty(img, np.float32), fmt.NOISE: self._empty(img, np.float32),
                    fmt.T: self._empty((b,), np.float32), fmt.S: self._empty((b,), np.float32),
                    fmt.ETA: self._empty((1,), np.float32), fmt.LABEL: self._empty((b,), np.int64),
                    fmt.GUIDANCE: self._empty((1,), np.float32)}
            if self.stateful:
                bufs.update({"u0": self._empty(img, np.float32), "u1": self._empty(img, np.float32),
                             fmt.T_PREV: self._empty((b,), np.float32)})
            self._buffers[b] = bufs
        self._bufs, self._b = self._buffers[b], b
        # With update_inplace the buffers keep their addresses, so two bindings serve every step.
        inplace = hasattr(self._bufs[fmt.T], "update_inplace")
        self._ios = [self._binding(0), self._binding(1)] if inplace else None

    def upload(self, name, array):
        """Copy a host array into input ``name`` (same address where ONNX Runtime allows: bindings stay valid)."""
        key = {fmt.Z: "z0", fmt.U_X_PREV: "u0"}.get(name, name)
        array = np.ascontiguousarray(array)
        ov = self._bufs[key]
        if hasattr(ov, "update_inplace"):  # ONNX Runtime >= 1.16
            ov.update_inplace(array)
        else:
            self._bufs[key] = self._ov(array)

    def _binding(self, parity, x0=None):
        """An I/O binding reading the state from buffers ``parity`` and writing it to the others."""
        bufs = self._bufs
        io = self.session.io_binding()
        io.bind_ortvalue_input(fmt.Z, bufs["z%d" % parity])
        io.bind_ortvalue_output(fmt.Z_NEXT, bufs["z%d" % (1 - parity)])
        if self.stateful:
            io.bind_ortvalue_input(fmt.U_X_PREV, bufs["u%d" % parity])
            io.bind_ortvalue_output(fmt.U_X, bufs["u%d" % (1 - parity)])
        for name in (fmt.T, fmt.S, fmt.ETA, fmt.NOISE, fmt.T_PREV, fmt.LABEL, fmt.GUIDANCE):
            if name in self.inputs:
                io.bind_ortvalue_input(name, bufs[name])
        if isinstance(x0, DeviceOut):  # the caller's device memory receives the last x0 directly
            io.bind_output(fmt.X0, "cuda", self.device_id, np.float32, list(x0.shape), x0.ptr)
        else:
            io.bind_ortvalue_output(fmt.X0, bufs[fmt.X0])
        return io

    # -- the loop's primitives ------------------------------------------------------------------
    # set_times, select: HostTimes's
    def step(self, parity, out=None):
        """One step reading state ``parity``; on the last step ``out`` may receive ``x0`` directly."""
        if isinstance(out, DeviceOut) and self.device != "cuda":
            raise BdmError("out is device memory, but ONNX Runtime runs on the CPU here: pass a numpy array")
        if self._ios is None or isinstance(out, DeviceOut):
            io = self._binding(parity, out)
        else:
            io = self._ios[parity]
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # ORT raises RuntimeError and its own types
            error = step_error(self._path, e, self._b, self._shape, self._symbolic)
            if error is None:  # not the user's request or file: a bug keeps its traceback
                raise
            raise error from None

    def step_inputs(self, parity):
        """Host copies of the inputs the next ``step(parity)`` reads, by graph input name.

        For recorders (``bdm_export.int8`` calibrates on them): the latent and ``u_x_prev`` are the
        state buffers of ``parity``, the rest what ``upload``/``select`` put in.
        """
        state = {fmt.Z: "z%d" % parity, fmt.U_X_PREV: "u%d" % parity}
        return {name: self._bufs[state.get(name, name)].numpy().copy() for name in self.inputs}

    def synchronize(self):
        """Nothing to wait for: ``run_with_iobinding`` returns when the step is done."""

    def download(self, out):
        """The last step's ``x0`` into the host array ``out`` (device ``out`` was bound directly)."""
        if not isinstance(out, DeviceOut):
            out[...] = self._bufs[fmt.X0].numpy()

    def close(self):
        """Drop the session and its buffers."""
        self._buffers = {}
        self._bufs = self._ios = None
        self.session = None
