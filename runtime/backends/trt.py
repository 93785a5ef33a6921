"""TensorRT backend: a bdm engine (``X.plan`` + ``X.plan.json``) through the named-tensor API.

Written against NVIDIA's documented Python API of TensorRT 8.5 and later
(``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
get_tensor_profile_shape``, ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3``). Device memory, copies and streams go through Polygraphy's ``polygraphy.cuda``
(a ctypes wrapper of the CUDA runtime, in the ``[trt]`` extra); CUDA-graph capture calls the
same runtime library (``cudaStreamBeginCapture``, ``cudaGraphInstantiateWithFlags``, ``cudaGraphLaunch``).

The latent stays on the GPU: two buffers swap roles each step (``z`` <-> ``z_next`` addresses);
per step only ``t``, ``s`` and, for ``eta > 0``, the noise are copied up, and ``x0`` is copied
once per chunk into the caller's array or device memory.
"""
import ctypes
import os
import re
import warnings

import numpy as np

from .. import format as fmt
from ..errors import BdmError
from ..io import writable_folder
from . import DeviceOut

_H2D, _D2H, _D2D = "HostToDevice", "DeviceToHost", "DeviceToDevice"  # polygraphy.cuda.MemcpyKind
_CAPTURE_MODE_GLOBAL = 0                # cudaStreamCaptureModeGlobal
MIN_TRT = (8, 5)                        # the named-tensor API above (num_io_tensors, execute_async_v3)


def import_tensorrt():
    """``tensorrt``, or a ``BdmError`` saying what to use instead."""
    try:
        import tensorrt
    except ImportError:
        raise BdmError("TensorRT is not installed here: run the .onnx with --backend ort "
                       "(or install TensorRT, e.g. from JetPack)")
    return tensorrt


def trt_version(trt):
    """``(major, minor)`` of ``tensorrt``; ``BdmError`` below 8.5, whose API bdm engines need."""
    m = re.match(r"(\d+)\.(\d+)", str(getattr(trt, "__version__", "")))
    if m is None:
        raise BdmError(f"cannot read the TensorRT version {getattr(trt, '__version__', None)!r}")
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_TRT:
        raise BdmError(f"TensorRT {trt.__version__} is too old: bdm engines need TensorRT "
                       f"{MIN_TRT[0]}.{MIN_TRT[1]} or later (or run the .onnx with --backend ort)")
    return version


def probe_cuda():
    """``(polygraphy.cuda, None)`` when the CUDA runtime sees a GPU, else ``(None, why)`` (one line)."""
    try:
        from polygraphy import cuda
    except ImportError:
        return None, "Polygraphy is not installed (pip install polygraphy, or bdm[trt])"
    try:
        lib = cuda.wrapper().handle
        count = ctypes.c_int(0)
        status = lib.cudaGetDeviceCount(ctypes.byref(count))
    except Exception as e:  # no libcudart, or Polygraphy's own exception
        return None, f"no CUDA runtime ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if status != 0 or count.value < 1:
        return None, "no CUDA GPU is visible"
    return cuda, None


def import_cuda():
    """``polygraphy.cuda`` with a visible GPU, or a ``BdmError``."""
    cuda, why = probe_cuda()
    if cuda is None:
        raise BdmError(f"the TensorRT backend cannot run here: {why}; run the .onnx with --backend ort")
    return cuda


def cached_engine(onnx_path, info, engine_cache=None, batch=None):
    """Path of a TensorRT engine for ``onnx_path``, built once per TensorRT version and batch profile, and cached.

    The engine ``<stem>.trt<version>[.b<batch>].plan`` lives beside the ``.onnx`` (or in
    ``engine_cache``), with profile ``1:batch:batch`` (export's default without ``batch``). It is
    rebuilt when missing, older than the ``.onnx``, or when its side file names another TensorRT
    or another profile.
    """
    trt = import_tensorrt()
    trt_version(trt)
    import_cuda()
    try:
        from export.trt import DEFAULT_BATCH, build_engine  # torch-free by contract (the [trt] extra)
    except ImportError as e:
        raise BdmError(f"cannot build a TensorRT engine here ({e}): build one with bdm-export --onnx")
    profile = tuple(DEFAULT_BATCH) if batch is None else (1, batch, batch)
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    folder = engine_cache or os.path.dirname(os.path.abspath(onnx_path))
    tag = "" if batch is None else f".b{batch}"
    plan = os.path.join(folder, f"{stem}.trt{trt.__version__}{tag}.plan")
    if _is_current(plan, onnx_path, trt.__version__, profile):
        return plan
    writable_folder(folder, "the TensorRT engine cache (pass engine_cache to choose another)")
    build_engine(onnx_path, plan, batch=profile)
    return plan


def _is_current(plan, onnx_path, version, profile):
    """Whether ``plan`` is newer than ``onnx_path`` and its side file names ``version`` and ``profile``."""
    from ..sampler import read_side_file

    if not os.path.exists(plan) or os.path.getmtime(plan) < os.path.getmtime(onnx_path):
        return False
    try:
        raw = read_side_file(plan)
    except (BdmError, OSError):
        return False
    want = {"min": profile[0], "opt": profile[1], "max": profile[2]}
    return raw.get(fmt.K_TRT_VERSION) == version and raw.get(fmt.K_PROFILE) == want


class _Buffer:
    """One device allocation (bytes), freed by :meth:`free`."""

    def __init__(self, cuda, nbytes):
        self._cuda = cuda
        self.nbytes = int(nbytes)
        self.ptr = cuda.wrapper().malloc(max(self.nbytes, 1))

    def free(self):
        if self.ptr:
            self._cuda.wrapper().free(self.ptr)
            self.ptr = 0


class TrtBackend:
    """Runs a bdm TensorRT engine; see the module docstring."""

    name = "trt"
    device = "cuda"

    def __init__(self, plan_path, info, raw, batch=None, cuda_stream=None, cuda_graph=False):
        # Nothing to release yet: close() frees whatever a failure below leaves allocated.
        self._closed = False
        self._context = self._engine = self._runtime = None
        self._own_stream, self.stream = None, None
        self._buf, self._graphs = {}, {}
        trt = import_tensorrt()
        trt_version(trt)
        built_by = raw.get(fmt.K_TRT_VERSION)
        if built_by != trt.__version__:
            raise BdmError(f"{plan_path}: engine built by TensorRT {built_by}, this is TensorRT {trt.__version__}: "
                           "rebuild it here (bdm-export --onnx MODEL.onnx --out ENGINE.plan) or run the .onnx "
                           "with --backend ort")
        if cuda_graph and cuda_stream is not None and int(cuda_stream) == 0:
            raise BdmError("--cuda-graph needs a non-default CUDA stream")  # capture is refused on stream 0
        self._cuda = cuda = import_cuda()
        self._lib = cuda.wrapper().handle
        self._trt = trt
        self.provider = f"TensorRT {trt.__version__}"
        self.cuda_graph = bool(cuda_graph)
        self._shape = None
        try:
            self._open(plan_path, info, batch, cuda_stream)
        except BaseException:
            self.close()
            raise

    def _open(self, plan_path, info, batch, cuda_stream):
        """Deserialize and check the engine, then create the stream and the device buffers."""
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(plan_path, "rb") as f:
            data = f.read()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BdmError(f"{plan_path}: TensorRT cannot deserialize it (not an engine, or built for another GPU)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = {n: self._engine.get_tensor_mode(n) for n in names}
        self.inputs = {n for n in names if mode[n] == trt.TensorIOMode.INPUT}
        outputs = {n for n in names if mode[n] == trt.TensorIOMode.OUTPUT}
        want = set(fmt.INPUTS) | ({fmt.LABEL} if info.num_classes else set()) | ({fmt.GUIDANCE} if info.guided else set())
        if self.inputs != want or outputs != set(fmt.OUTPUTS):
            raise BdmError(f"{plan_path}: engine tensors {sorted(names)} do not match its metadata")
        self._dtype = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        declared = tuple(self._engine.get_tensor_shape(fmt.Z))  # (-1, C, H, W): dynamic batch
        if len(declared) != 4 or any(d >= 0 and d != m for d, m in zip(declared[1:], info.image_shape)):
            raise BdmError(f"{plan_path}: its side file says images are {'x'.join(map(str, info.image_shape))} "
                           f"(C x H x W), but the engine's z is {'x'.join(map(str, declared))}: build it again")
        lo, _, hi = self._engine.get_tensor_profile_shape(fmt.Z, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        if batch is not None:
            self.max_batch = max(self.min_batch, min(self.max_batch, batch))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BdmError(f"{plan_path}: TensorRT could not create an execution context (out of GPU memory?)")
        if cuda_stream is None:
            self._own_stream = self._cuda.Stream()
            self.stream = self._own_stream.ptr
        else:
            self.stream = int(cuda_stream)
        self._alloc(info.image_shape)

    # -- memory ---------------------------------------------------------------------------------
    def _alloc(self, image_shape):
        """Device buffers for the profile's largest batch: their addresses never change."""
        b = self.max_batch
        img = int(np.prod(image_shape))
        self._image_shape = tuple(image_shape)
        sizes = {"z0": b * img * 4, "z1": b * img * 4, fmt.X0: b * img * 4, fmt.NOISE: b * img * 4,
                 fmt.T: b * 4, fmt.S: b * 4, fmt.ETA: 4}
        if fmt.LABEL in self.inputs:
            sizes[fmt.LABEL] = b * self._dtype[fmt.LABEL].itemsize
        if fmt.GUIDANCE in self.inputs:
            sizes[fmt.GUIDANCE] = 4
        self._buf = {}
        for name, nbytes in sizes.items():
            self._buf[name] = _Buffer(self._cuda, nbytes)

    def _copy(self, dst, src, nbytes, kind):
        """Asynchronous copy on our stream (host memory is pageable: staged before it returns)."""
        self._cuda.wrapper().memcpy(dst, src, nbytes, getattr(self._cuda.MemcpyKind, kind), self.stream)

    def _up(self, name, array):
        array = np.ascontiguousarray(array, dtype=self._dtype.get(name, np.float32))
        self._copy(self._buf[name].ptr, array.ctypes.data, array.nbytes, _H2D)
        return array  # keep it alive until the copy is enqueued

    # -- execution ------------------------------------------------------------------------------
    def _set_shapes(self, b):
        if self._shape == b:
            return
        img = (b,) + self._image_shape
        shapes = {fmt.Z: img, fmt.NOISE: img, fmt.T: (b,), fmt.S: (b,), fmt.ETA: (1,),
                  fmt.LABEL: (b,), fmt.GUIDANCE: (1,)}
        for name in self.inputs:
            if not self._context.set_input_shape(name, shapes[name]):
                raise BdmError(f"TensorRT refused shape {shapes[name]} for input {name}")
        for name in (fmt.T, fmt.S, fmt.ETA, fmt.NOISE, fmt.LABEL, fmt.GUIDANCE, fmt.X0):
            if name in self.inputs or name == fmt.X0:
                self._context.set_tensor_address(name, self._buf[name].ptr)
        self._shape = b

    def _bind_latent(self, parity):
        """``z`` from buffer ``parity``, ``z_next`` into the other."""
        self._context.set_tensor_address(fmt.Z, self._buf["z%d" % parity].ptr)
        self._context.set_tensor_address(fmt.Z_NEXT, self._buf["z%d" % (1 - parity)].ptr)

    def _execute(self, parity, warm):
        """One step; replayed from a captured CUDA graph when enabled and this shape has run once."""
        self._bind_latent(parity)
        key = (self._shape, parity)
        if self.cuda_graph and warm and key not in self._graphs:
            self._graphs[key] = self._capture()
        graph = self._graphs.get(key) if self.cuda_graph else None
        if graph is not None:
            self._check(self._lib.cudaGraphLaunch(ctypes.c_void_p(graph[1]), ctypes.c_void_p(self.stream)),
                        "cudaGraphLaunch")
        elif not self._context.execute_async_v3(self.stream):
            raise BdmError("TensorRT execute_async_v3 failed (see TensorRT's log above)")

    def _capture(self):
        """Capture ``execute_async_v3`` on our stream as a CUDA graph; ``None`` (with a warning) if refused."""
        lib, stream = self._lib, ctypes.c_void_p(self.stream)
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        if lib.cudaStreamBeginCapture(stream, ctypes.c_int(_CAPTURE_MODE_GLOBAL)) != 0:
            lib.cudaGetLastError()
            warnings.warn("CUDA graph capture unavailable; running the step without it")
            return None
        ok = self._context.execute_async_v3(self.stream)
        status = lib.cudaStreamEndCapture(stream, ctypes.byref(graph))
        if not ok or status != 0 or not graph.value:
            lib.cudaGetLastError()
            if graph.value:
                lib.cudaGraphDestroy(graph)
            warnings.warn("TensorRT step could not be captured as a CUDA graph; running it without")
            return None
        if lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)) != 0:
            lib.cudaGetLastError()
            lib.cudaGraphDestroy(graph)
            warnings.warn("CUDA graph instantiation failed; running the step without it")
            return None
        return graph.value, exe.value

    def _check(self, status, what):
        if status != 0:
            raise BdmError(f"CUDA error {status} in {what}")

    def _sync(self):
        self._check(self._lib.cudaStreamSynchronize(ctypes.c_void_p(self.stream)), "cudaStreamSynchronize")

    # -- the loop -------------------------------------------------------------------------------
    def run(self, z, times, eta, noise, labels, guidance, out, on_step=None):
        """Run all steps of ``times`` on one chunk and write the final ``x0`` into ``out``."""
        b = z.shape[0]
        rb = max(b, self.min_batch)  # below the profile minimum: pad, and drop the padding at the end
        img = z.shape[1:]

        def padded(a, dtype):
            full = np.zeros((rb,) + a.shape[1:], dtype=dtype)
            full[:b] = a
            return full

        self._set_shapes(rb)
        keep = [self._up("z0", padded(z, np.float32)), self._up(fmt.ETA, np.array([eta], np.float32))]
        host_noise = np.zeros((rb,) + img, dtype=np.float32)
        if noise is None:  # eta = 0: the graph multiplies the noise by 0; zeros once
            keep.append(self._up(fmt.NOISE, host_noise))
        if fmt.LABEL in self.inputs:
            keep.append(self._up(fmt.LABEL, padded(np.asarray(labels), self._dtype[fmt.LABEL])))
        if fmt.GUIDANCE in self.inputs:
            keep.append(self._up(fmt.GUIDANCE, np.array([guidance or 0.0], np.float32)))
        steps = len(times) - 1
        t_all = np.repeat(np.asarray(times, np.float32)[:, None], rb, axis=1)  # row i: t_i for every image
        for i in range(steps):
            self._up(fmt.T, t_all[i])
            self._up(fmt.S, t_all[i + 1])
            if noise is not None:
                host_noise[:b] = noise()  # drawn on the host while the previous step runs
                self._up(fmt.NOISE, host_noise)
            self._execute(i % 2, warm=i > 0)
            if on_step is not None:
                on_step()
        nbytes = b * int(np.prod(img)) * 4
        if isinstance(out, DeviceOut):
            self._copy(out.ptr, self._buf[fmt.X0].ptr, nbytes, _D2D)
        else:
            self._sync()
            self._copy(out.ctypes.data, self._buf[fmt.X0].ptr, nbytes, _D2H)
        self._sync()
        del keep

    def close(self):
        """Destroy graphs, context, engine, buffers and our stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            try:
                self._sync()
            except BdmError:
                pass
        for graph, exe in (g for g in self._graphs.values() if g is not None):
            self._lib.cudaGraphExecDestroy(ctypes.c_void_p(exe))
            self._lib.cudaGraphDestroy(ctypes.c_void_p(graph))
        self._graphs = {}
        self._context = None   # TensorRT >= 10 frees on release; 8.x via __del__ as well
        self._engine = None
        self._runtime = None
        for buf in self._buf.values():
            buf.free()
        self._buf = {}
        if self._own_stream is not None:
            self._own_stream.free()
            self._own_stream = None
