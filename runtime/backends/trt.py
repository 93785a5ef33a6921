"""TensorRT backend: a bdm engine (``X.plan`` + ``X.plan.json``) through the named-tensor API.

Written against NVIDIA's Python bindings of TensorRT 8.5 to 11 (``ICudaEngine.num_io_tensors /
get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_profile_shape``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``, all present from
8.5.3 to 11.1; ``tests/test_trt_fake.py`` runs this module against each version's names).

Loading: on TensorRT 8.5/8.6 (JetPack 5, 6.0) the ONNX parser may turn GroupNorm's
``InstanceNormalization`` into TensorRT's ``InstanceNormalization_TRT`` plugin, so the plugins are
registered (``trt.init_libnvinfer_plugins(logger, "")``) before the engine is deserialized, with
Polygraphy's ``EngineFromBytes`` and Polygraphy's TensorRT logger (a second ``trt.Logger`` makes
TensorRT warn that the logger differs).

Execution (upload, step and download of the shared loop, ``bdm_runtime.loop``): all work goes on a
non-blocking CUDA stream of our own (``bdm_runtime.backends.cudart``); a caller's stream
(``cuda_stream``) is waited for at the start of each chunk, and the stream of a caller's device
buffer (``__cuda_array_interface__`` v3 ``stream``) before writing into it. The latent (and a
format-2 graph's ``u_x`` state, B11) stays on the GPU: two buffers swap roles each step (``z`` <->
``z_next``, ``u_x_prev`` <-> ``u_x`` addresses); the time grid (and ``t_prev``) is uploaded once per
chunk and each step's ``(t, s)`` (and ``t_prev``) rows are copied on the device; per step only the
noise (``eta > 0``) comes from the host. ``x0`` is copied once per chunk.

CUDA graphs (``cuda_graph=True``): one graph per (batch, state parity), capturing only
``execute_async_v3``, thread-local, on our stream. TensorRT's first ``execute_async_v3`` after
``set_input_shape`` does shape-dependent set-up that must not be captured nor skipped, so after
every shape change one plain ``execute_async_v3`` runs before any capture or replay.
"""
import re
import warnings

import numpy as np

from .. import format as fmt
from ..errors import BdmError
from . import DeviceOut
from .cudart import D2D, D2H, H2D, probe

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
    """``(cudart.Cudart, None)`` when the CUDA runtime sees a GPU, else ``(None, why)`` (one line)."""
    return probe()


def import_cuda():
    """A :class:`cudart.Cudart` with a visible GPU, or a ``BdmError``."""
    cuda, why = probe()
    if cuda is None:
        raise BdmError(f"the TensorRT backend cannot run here: {why}; run the .onnx with --backend ort")
    return cuda


def device_tag(device):
    """``nvidia-orin-sm87`` for ``{"name": "NVIDIA Orin", "compute_capability": [8, 7]}`` (file names)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-") or "gpu"
    return "%s-sm%d%d" % ((slug,) + tuple(device["compute_capability"]))


def _check_device(plan_path, raw, device):
    """Refuse an engine whose side file names another compute capability (TensorRT could not run it)."""
    built = raw.get(fmt.K_TRT_DEVICE)
    if isinstance(built, dict) and built.get("compute_capability") != device["compute_capability"]:
        cc = ".".join(str(v) for v in built.get("compute_capability") or ["?"])
        here = ".".join(str(v) for v in device["compute_capability"])
        raise BdmError(f"{plan_path}: engine built for {built.get('name')} (compute capability {cc}), this GPU is "
                       f"{device['name']} ({here}): rebuild it here (bdm-export --onnx MODEL.onnx --out ENGINE.plan) "
                       "or run the .onnx with --backend trt, which builds and caches one")


class TrtBackend:
    """Runs a bdm TensorRT engine; see the module docstring."""

    name = "trt"
    device = "cuda"

    def __init__(self, plan_path, info, raw, batch=None, cuda_stream=None, cuda_graph=False):
        # Nothing to release yet: close() frees whatever a failure below leaves allocated.
        self._closed = False
        self._context = self._engine = self._runtime = None
        self.stream = self._event = None
        self._buf, self._graphs = {}, {}
        trt = import_tensorrt()
        trt_version(trt)
        built_by = raw.get(fmt.K_TRT_VERSION)
        if built_by != trt.__version__:
            raise BdmError(f"{plan_path}: engine built by TensorRT {built_by}, this is TensorRT {trt.__version__}: "
                           "rebuild it here (bdm-export --onnx MODEL.onnx --out ENGINE.plan) or run the .onnx "
                           "with --backend ort")
        self._cuda = import_cuda()
        _check_device(plan_path, raw, self._cuda.device())
        self._trt = trt
        self.provider = f"TensorRT {trt.__version__}"
        self.cuda_graph = bool(cuda_graph)
        self._caller_stream = None if cuda_stream is None else int(cuda_stream)
        self._shape, self._fresh, self._grid_size = None, True, {}
        try:
            self._open(plan_path, info, batch)
        except BaseException:
            try:
                self.close()
            except BdmError:
                pass  # the error that stopped the opening is the one to report
            raise

    def _open(self, plan_path, info, batch):
        """Deserialize and check the engine, then create the stream, the event and the device buffers."""
        trt = self._trt
        self._engine = self._deserialize(plan_path)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = {n: self._engine.get_tensor_mode(n) for n in names}
        self.inputs = {n for n in names if mode[n] == trt.TensorIOMode.INPUT}
        outputs = {n for n in names if mode[n] == trt.TensorIOMode.OUTPUT}
        want = set(fmt.inputs(info.format_version, info.num_classes, info.guided))
        if self.inputs != want or outputs != set(fmt.outputs(info.format_version)):
            raise BdmError(f"{plan_path}: engine tensors {sorted(names)} do not match its metadata")
        self._dtype = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        lo, _, hi = self._engine.get_tensor_profile_shape(fmt.Z, 0)
        if tuple(int(d) for d in lo[1:]) != tuple(info.image_shape):  # z's profile is [b, C, H, W]
            raise BdmError(f"{plan_path}: its side file says images are {'x'.join(map(str, info.image_shape))} "
                           f"(C x H x W), but the engine's z is {'x'.join(map(str, lo[1:]))}: build it again")
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        if batch is not None:
            self.max_batch = max(self.min_batch, min(self.max_batch, batch))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BdmError(f"{plan_path}: TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = self._cuda.stream_create()
        self._event = self._cuda.event_create()
        self._alloc(info.image_shape)

    def _deserialize(self, plan_path):
        from polygraphy.backend.trt import EngineFromBytes, get_trt_logger
        from polygraphy.exception import PolygraphyException

        with open(plan_path, "rb") as f:
            data = f.read()
        logger = get_trt_logger()
        # Explicit, though EngineFromBytes registers them too: a JetPack 5 engine cannot load without.
        self._trt.init_libnvinfer_plugins(logger, "")
        self._runtime = self._trt.Runtime(logger)
        try:
            return EngineFromBytes(data, runtime=self._runtime)()
        except PolygraphyException:  # TensorRT's reason is in its log above
            raise BdmError(f"{plan_path}: TensorRT cannot deserialize it (not an engine, built for another GPU, "
                           "or out of GPU memory: see TensorRT's log above)")

    # -- memory ---------------------------------------------------------------------------------
    def _alloc(self, image_shape):
        """Device buffers for the profile's largest batch: their addresses never change.

        ``ts`` holds the step's ``t`` (first ``b`` values) and ``s`` (next ``b``): one copy from
        the uploaded time grid per step (and one more into ``t_prev`` for format 2).
        """
        b = self.max_batch
        img = int(np.prod(image_shape))
        self._image_shape = tuple(image_shape)
        sizes = {"z0": b * img * 4, "z1": b * img * 4, fmt.X0: b * img * 4, fmt.NOISE: b * img * 4,
                 "ts": 2 * b * 4, fmt.ETA: 4}
        if fmt.U_X_PREV in self.inputs:  # format 2: B11's state swaps like the latent
            sizes.update({"u0": b * img * 4, "u1": b * img * 4, fmt.T_PREV: b * 4})
        if fmt.LABEL in self.inputs:
            sizes[fmt.LABEL] = b * self._dtype[fmt.LABEL].itemsize
        if fmt.GUIDANCE in self.inputs:
            sizes[fmt.GUIDANCE] = 4
        for name, nbytes in sizes.items():
            self._buf[name] = self._cuda.malloc(nbytes, f"the TensorRT buffer {name!r} (batch {b})")

    def _up(self, ptr, array):
        """Host -> device on our stream (pageable memory: staged before the call returns)."""
        self._cuda.copy(ptr, array.ctypes.data, array.nbytes, H2D, self.stream)

    def _upload_grid(self, name, times, rb):
        """A ``(len(times), rb)`` grid into buffer ``name``, row ``i`` = ``times[i]`` for every image, in one copy."""
        grid = np.ascontiguousarray(np.repeat(np.asarray(times, np.float32)[:, None], rb, axis=1))
        if grid.size > self._grid_size.get(name, 0):  # grown for more steps (chunks end synchronised)
            if name in self._buf:
                self._cuda.free(self._buf.pop(name))
            self._buf[name] = self._cuda.malloc(grid.nbytes, "the time grid")
            self._grid_size[name] = grid.size
        self._up(self._buf[name], grid)

    # -- execution ------------------------------------------------------------------------------
    def _bind(self, name, ptr):
        if not self._context.set_tensor_address(name, ptr):
            raise BdmError(f"TensorRT refused the device address of tensor {name!r} (see TensorRT's log above)")

    def _set_shapes(self, b):
        """Input shapes for batch ``b`` and the addresses that depend on it; the next step runs plainly."""
        if self._shape == b:
            return
        img = (b,) + self._image_shape
        shapes = {fmt.Z: img, fmt.NOISE: img, fmt.T: (b,), fmt.S: (b,), fmt.ETA: (1,),
                  fmt.LABEL: (b,), fmt.GUIDANCE: (1,), fmt.T_PREV: (b,), fmt.U_X_PREV: img}
        for name in sorted(self.inputs):
            if not self._context.set_input_shape(name, shapes[name]):
                raise BdmError(f"TensorRT refused shape {shapes[name]} for input {name}")
        ptr = dict(self._buf, **{fmt.T: self._buf["ts"], fmt.S: self._buf["ts"] + 4 * b})
        for name in (fmt.T, fmt.S, fmt.ETA, fmt.NOISE, fmt.T_PREV, fmt.LABEL, fmt.GUIDANCE, fmt.X0):
            if name in self.inputs or name == fmt.X0:
                self._bind(name, ptr[name])
        self._shape, self._fresh = b, True

    def _enqueue(self):
        if not self._context.execute_async_v3(self.stream):
            raise BdmError("TensorRT execute_async_v3 failed (see TensorRT's log above)")

    def _execute(self, parity):
        """One step, the state (``z``, ``u_x_prev``) from buffers ``parity`` and into the others (module docstring)."""
        self._bind(fmt.Z, self._buf["z%d" % parity])
        self._bind(fmt.Z_NEXT, self._buf["z%d" % (1 - parity)])
        if fmt.U_X_PREV in self.inputs:
            self._bind(fmt.U_X_PREV, self._buf["u%d" % parity])
            self._bind(fmt.U_X, self._buf["u%d" % (1 - parity)])
        if not self.cuda_graph or self._fresh:
            self._enqueue()
            self._fresh = False
            return
        key = (self._shape, parity)
        if key not in self._graphs:
            self._graphs[key] = self._cuda.capture(self.stream, lambda: self._context.execute_async_v3(self.stream))
            if self._graphs[key] is None:
                warnings.warn("TensorRT step could not be captured as a CUDA graph; running it without")
        graph = self._graphs[key]
        if graph is None:
            self._enqueue()
        else:
            self._cuda.launch(graph[1], self.stream)

    # -- the loop's primitives (bdm_runtime.loop) ---------------------------------------------------
    def prepare(self, b):
        """Shapes for a chunk of ``b`` images (padded to the profile minimum), after the caller's stream."""
        self._b, self._rb = b, max(b, self.min_batch)
        if self._caller_stream is not None:
            self._cuda.wait(self.stream, self._caller_stream, self._event)
        self._set_shapes(self._rb)

    def upload(self, name, array):
        """Host ``array`` into input ``name`` (``z``, ``u_x_prev``: state buffers 0); per-image inputs padded."""
        dtype = self._dtype.get(name, np.float32)
        array = np.asarray(array)
        if name in fmt.PER_IMAGE and self._rb > self._b:  # below the profile minimum: zeros, dropped at the end
            full = np.zeros((self._rb,) + array.shape[1:], dtype=dtype)
            full[:self._b] = array
            array = full
        key = {fmt.Z: "z0", fmt.U_X_PREV: "u0"}.get(name, name)
        self._up(self._buf[key], np.ascontiguousarray(array, dtype=dtype))

    def set_times(self, times, t_prev=None):
        """The chunk's time grid (and ``t_prev`` of every step, format 2) to the device, once."""
        self._upload_grid("grid", times, self._rb)
        if t_prev is not None:
            self._upload_grid("prev", t_prev, self._rb)

    def select(self, i):
        """Step ``i``'s ``t_i, t_{i+1}`` (and ``t_prev``) rows into the inputs, on the device."""
        rb = self._rb
        self._cuda.copy(self._buf["ts"], self._buf["grid"] + 4 * rb * i, 8 * rb, D2D, self.stream)
        if fmt.T_PREV in self.inputs:
            self._cuda.copy(self._buf[fmt.T_PREV], self._buf["prev"] + 4 * rb * i, 4 * rb, D2D, self.stream)

    def step(self, parity, out=None):
        """One step reading state ``parity`` (``out`` is written by :meth:`download`)."""
        self._execute(parity)

    def synchronize(self):
        self._cuda.sync(self.stream)

    def download(self, out):
        """The last step's ``x0`` into ``out`` (host array or ``DeviceOut``), then wait for it."""
        nbytes = self._b * int(np.prod(self._image_shape)) * 4
        if isinstance(out, DeviceOut):
            if out.stream is not None:  # CAI v3: order our write after the producer's work on its stream
                self._cuda.wait(self.stream, out.stream, self._event)
            self._cuda.copy(out.ptr, self._buf[fmt.X0], nbytes, D2D, self.stream)
        else:
            self._cuda.copy(out.ctypes.data, self._buf[fmt.X0], nbytes, D2H, self.stream)
        self._cuda.sync(self.stream)

    def close(self):
        """Destroy graphs, context, engine, buffers, event and stream (idempotent).

        Every release is attempted even when one fails; the first failure is then raised.
        """
        if self._closed:
            return
        self._closed = True
        errors = []

        def attempt(release, *args):
            try:
                release(*args)
            except Exception as e:  # keep releasing the rest
                errors.append(e)

        if self.stream is not None:
            attempt(self._cuda.sync, self.stream)
        for graph in self._graphs.values():
            if graph is not None:
                attempt(self._cuda.graph_destroy, *graph)
        self._graphs = {}
        self._context = None   # the context before the engine (it keeps the engine alive until then)
        self._engine = None
        self._runtime = None
        for ptr in self._buf.values():
            attempt(self._cuda.free, ptr)
        self._buf = {}
        if self._event is not None:
            attempt(self._cuda.event_destroy, self._event)
        if self.stream is not None:
            attempt(self._cuda.stream_destroy, self.stream)
        self._event = self.stream = None
        if errors:
            raise BdmError(f"closing the TensorRT backend: {len(errors)} release(s) failed, the first: {errors[0]}")
