"""The CUDA runtime calls of the TensorRT backend, made on the library Polygraphy loads.

Polygraphy (the ``[trt]`` extra) finds and opens the CUDA runtime, ``libcudart``
(``polygraphy.cuda.wrapper().handle``, a ``ctypes.CDLL``). Its own helpers create blocking streams
and log, then raise, on any error status, so the backend calls the library itself, here, and
checks every status: running out of device memory (``cudaErrorMemoryAllocation``) is a one-line
``BdmError``; streams are non-blocking (``cudaStreamNonBlocking``: no implicit synchronisation
with the legacy default stream other threads of the host program may use); CUDA-graph capture
is thread-local (``cudaStreamCaptureModeThreadLocal``: another thread's ``cudaMalloc`` stays legal
while a step is captured).

Every pointer and handle is passed as ``c_void_p``, every size as ``c_size_t`` and every flag
as a sized C integer: ctypes would pass a bare Python int as a 32-bit C ``int``.
"""
import ctypes

from ..errors import BdmError

# CUDA runtime API constants (driver_types.h).
SUCCESS, ERROR_MEMORY_ALLOCATION = 0, 2
H2D, D2H, D2D = 1, 2, 3                  # cudaMemcpyKind
STREAM_NON_BLOCKING = 0x01               # cudaStreamNonBlocking
EVENT_DISABLE_TIMING = 0x02              # cudaEventDisableTiming
CAPTURE_THREAD_LOCAL = 1                 # cudaStreamCaptureModeThreadLocal
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76    # cudaDevAttrComputeCapabilityMajor / Minor
PROP_BYTES = 4096                        # > sizeof(cudaDeviceProp) in every CUDA; name[256] comes first
_VP = ctypes.c_void_p


def probe():
    """``(Cudart, None)`` when the CUDA runtime sees a GPU, else ``(None, why)`` (one line)."""
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
    if status != SUCCESS or count.value < 1:
        return None, "no CUDA GPU is visible"
    return Cudart(lib), None


class Cudart:
    """Checked calls on ``lib`` (a ``libcudart`` ``CDLL``)."""

    def __init__(self, lib):
        self.lib = lib

    def check(self, status, what):
        if status == SUCCESS:
            return
        self.lib.cudaGetLastError()  # reset the last-error state, so later calls report their own
        if status == ERROR_MEMORY_ALLOCATION:
            raise BdmError(f"out of GPU memory in {what}: close other GPU programs or use a smaller --batch")
        raise BdmError(f"CUDA error {status} ({self.error_name(status)}) in {what}")

    def error_name(self, status):
        """``cudaGetErrorName(status)``, e.g. ``cudaErrorIllegalAddress``: what the number means, for the
        message (``const char *``; "unrecognized error code" from CUDA itself for a number it does not know)."""
        try:
            fn = self.lib.cudaGetErrorName
            if isinstance(fn, ctypes._CFuncPtr):
                fn.restype = ctypes.c_char_p  # a C function returns int to ctypes unless told
            name = fn(ctypes.c_int(int(status)))
            return name.decode("ascii", "replace") if isinstance(name, bytes) else "no name"
        except Exception:  # an old or odd libcudart: the number alone still says it
            return "no name"

    # -- device ---------------------------------------------------------------------------------
    def device(self):
        """``{"name": ..., "compute_capability": [major, minor]}`` of the current device."""
        dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
        for attr, out in ((ATTR_CC_MAJOR, major), (ATTR_CC_MINOR, minor)):
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(out), ctypes.c_int(attr), dev),
                       "cudaDeviceGetAttribute")
        prop = ctypes.create_string_buffer(PROP_BYTES)
        # CUDA 12 headers call cudaGetDeviceProperties_v2; CUDA 11 (JetPack 5) has only the first.
        get = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self.check(get(prop, dev), "cudaGetDeviceProperties")
        name = prop.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace").strip()
        return {"name": name, "compute_capability": [major.value, minor.value]}

    # -- memory ---------------------------------------------------------------------------------
    def malloc(self, nbytes, what):
        ptr = _VP()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))),
                   f"cudaMalloc of {int(nbytes)} bytes for {what}")
        return ptr.value

    def free(self, ptr):
        self.check(self.lib.cudaFree(_VP(ptr)), "cudaFree")

    def copy(self, dst, src, nbytes, kind, stream):
        """``cudaMemcpyAsync`` (from pageable host memory it returns once the source is staged)."""
        self.check(self.lib.cudaMemcpyAsync(_VP(dst), _VP(src), ctypes.c_size_t(nbytes), ctypes.c_int(kind),
                                            _VP(stream)), "cudaMemcpyAsync")

    # -- streams and events ---------------------------------------------------------------------
    def stream_create(self):
        """A new non-blocking stream (see the module docstring)."""
        s = _VP()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), ctypes.c_uint(STREAM_NON_BLOCKING)),
                   "cudaStreamCreateWithFlags")
        return s.value

    def stream_destroy(self, stream):
        self.check(self.lib.cudaStreamDestroy(_VP(stream)), "cudaStreamDestroy")

    def sync(self, stream):
        self.check(self.lib.cudaStreamSynchronize(_VP(stream)), "cudaStreamSynchronize")

    def event_create(self):
        e = _VP()
        self.check(self.lib.cudaEventCreateWithFlags(ctypes.byref(e), ctypes.c_uint(EVENT_DISABLE_TIMING)),
                   "cudaEventCreateWithFlags")
        return e.value

    def event_destroy(self, event):
        self.check(self.lib.cudaEventDestroy(_VP(event)), "cudaEventDestroy")

    def wait(self, stream, other, event):
        """Make ``stream`` wait for the work enqueued so far on ``other`` (through ``event``); the host goes on."""
        self.check(self.lib.cudaEventRecord(_VP(event), _VP(other)), "cudaEventRecord")
        self.check(self.lib.cudaStreamWaitEvent(_VP(stream), _VP(event), ctypes.c_uint(0)), "cudaStreamWaitEvent")

    # -- CUDA graphs ----------------------------------------------------------------------------
    def capture(self, stream, enqueue):
        """A CUDA graph of what ``enqueue()`` puts on ``stream`` (thread-local capture), or ``None`` if refused.

        Returns ``(graph, graph_exec)``; ``enqueue`` returns whether it succeeded.
        """
        lib, s = self.lib, _VP(stream)
        if lib.cudaStreamBeginCapture(s, ctypes.c_int(CAPTURE_THREAD_LOCAL)) != SUCCESS:
            lib.cudaGetLastError()
            return None
        graph, exe = _VP(), _VP()
        try:
            ok = enqueue()
        finally:
            status = lib.cudaStreamEndCapture(s, ctypes.byref(graph))  # always: never leave the stream capturing
        if not ok or status != SUCCESS or not graph.value:
            lib.cudaGetLastError()
            if graph.value:
                lib.cudaGraphDestroy(graph)
            return None
        if lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)) != SUCCESS:
            lib.cudaGetLastError()
            lib.cudaGraphDestroy(graph)
            return None
        return graph.value, exe.value

    def launch(self, graph_exec, stream):
        self.check(self.lib.cudaGraphLaunch(_VP(graph_exec), _VP(stream)), "cudaGraphLaunch")

    def graph_destroy(self, graph, graph_exec):
        self.check(self.lib.cudaGraphExecDestroy(_VP(graph_exec)), "cudaGraphExecDestroy")
        self.check(self.lib.cudaGraphDestroy(_VP(graph)), "cudaGraphDestroy")
