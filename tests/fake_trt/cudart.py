"""A fake ``libcudart``: the CUDA runtime functions the TensorRT backend calls, on host memory.

It stands where ``polygraphy.cuda.wrapper().handle`` (a ``ctypes.CDLL``) stands and is called the
same way, with ctypes arguments, which it checks as the C ABI would need them (pointers and
handles ``c_void_p``, sizes ``c_size_t``, out-parameters ``byref``): a bare Python int would be
passed as a 32-bit C int by ctypes. "Device" memory is host memory (``ctypes`` buffers) whose
address is the device pointer; every copy checks that its device side lies inside a live
allocation. Work runs when enqueued, except on a capturing stream, where it is recorded into the
graph being captured. Everything is logged in ``calls``; misuse is collected in ``violations``.
"""
import ctypes

SUCCESS, INVALID_VALUE, MEMORY_ALLOCATION, INVALID_HANDLE, CAPTURE_UNSUPPORTED, CAPTURE_ILLEGAL = 0, 1, 2, 400, 900, 901
H2D, D2H, D2D = 1, 2, 3
LEGACY_STREAMS = (0, 1, 2)  # default, cudaStreamLegacy, cudaStreamPerThread


def _arg_type(arg, ctype, what):
    if not isinstance(arg, ctype):
        raise TypeError(f"{what}: want {ctype.__name__}, got {type(arg).__name__} (ctypes would pass a C int)")
    return arg.value


def _out(arg, ctype, what):
    obj = getattr(arg, "_obj", None)  # ctypes.byref(x) is a CArgObject holding x
    if type(arg).__name__ != "CArgObject" or not isinstance(obj, ctype):
        raise TypeError(f"{what}: want byref({ctype.__name__}), got {type(arg).__name__}")
    return obj


class FakeCudart:
    """One GPU (``name``, compute capability ``cc``, ``memory`` bytes) behind the CUDA runtime API."""

    def __init__(self, name="NVIDIA Orin", cc=(8, 7), memory=1 << 30):
        self.name, self.cc, self.memory = name, tuple(cc), memory
        self.calls, self.violations = [], []
        self.live = {}             # device pointer -> ctypes buffer
        self.freed = []
        self.fail_free = set()     # pointers whose cudaFree fails
        self.streams = {}          # handle -> {"flags": f, "capture": None or {"mode": m, "ops": [...]}}
        self.events, self.graphs, self.execs = {}, {}, {}
        self._next = 0x5000

    def _handle(self):
        self._next += 0x10
        return self._next

    def _log(self, name, **args):
        self.calls.append((name, args))

    # -- helpers for the fake TensorRT and the tests ----------------------------------------------
    def allocation(self, ptr, nbytes):
        """The live allocation holding ``[ptr, ptr + nbytes)``, or ``None``."""
        for base, buf in self.live.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return base
        return None

    def view(self, ptr, nbytes):
        """``nbytes`` of device memory at ``ptr`` as a writable ctypes array (checked)."""
        if self.allocation(ptr, nbytes) is None:
            raise AssertionError(f"device access of {nbytes} bytes at {ptr:#x} outside every live allocation")
        return (ctypes.c_char * nbytes).from_address(ptr)

    def submit(self, stream, op):
        """Run ``op`` now, or record it when ``stream`` is capturing; returns whether it was captured."""
        capture = self.streams.get(stream, {}).get("capture")
        if capture is not None:
            capture["ops"].append(op)
            return True
        op()
        return False

    def capturing(self, stream):
        return self.streams.get(stream, {}).get("capture") is not None

    def user_stream(self, flags=0):
        """A stream of the host program (blocking by default, as ``cudaStreamCreate`` makes)."""
        h = self._handle()
        self.streams[h] = {"flags": flags, "capture": None, "owner": "user"}
        return h

    def device_malloc(self, nbytes):
        """Device memory of the host program (for ``__cuda_array_interface__`` outputs)."""
        buf = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    # -- device ---------------------------------------------------------------------------------
    def cudaGetDeviceCount(self, count):
        _out(count, ctypes.c_int, "cudaGetDeviceCount").value = 1
        return SUCCESS

    def cudaGetDevice(self, dev):
        _out(dev, ctypes.c_int, "cudaGetDevice").value = 0
        return SUCCESS

    def cudaDeviceGetAttribute(self, value, attr, dev):
        out = _out(value, ctypes.c_int, "cudaDeviceGetAttribute")
        attr = _arg_type(attr, ctypes.c_int, "cudaDeviceGetAttribute attr")
        if attr not in (75, 76):
            return INVALID_VALUE
        out.value = self.cc[attr - 75]
        return SUCCESS

    def cudaGetDeviceProperties(self, prop, dev):  # CUDA 11: no _v2
        if not isinstance(prop, ctypes.Array) or len(prop) < 1032:
            raise TypeError("cudaGetDeviceProperties needs a cudaDeviceProp-sized buffer")
        name = self.name.encode()[:255]
        ctypes.memmove(prop, name + b"\0", len(name) + 1)
        return SUCCESS

    def cudaGetLastError(self):
        return SUCCESS

    NAMES = {INVALID_VALUE: b"cudaErrorInvalidValue", MEMORY_ALLOCATION: b"cudaErrorMemoryAllocation",
             INVALID_HANDLE: b"cudaErrorInvalidResourceHandle", CAPTURE_UNSUPPORTED: b"cudaErrorStreamCaptureUnsupported",
             CAPTURE_ILLEGAL: b"cudaErrorStreamCaptureInvalidated"}  # driver_types.h

    def cudaGetErrorName(self, status):  # const char * (restype c_char_p): bytes here
        return self.NAMES.get(_arg_type(status, ctypes.c_int, "cudaGetErrorName"), b"unrecognized error code")

    # -- memory ---------------------------------------------------------------------------------
    def cudaMalloc(self, ptr, size):
        out = _out(ptr, ctypes.c_void_p, "cudaMalloc")
        n = _arg_type(size, ctypes.c_size_t, "cudaMalloc size")
        self._log("cudaMalloc", size=n)
        if sum(len(b) for b in self.live.values()) + n > self.memory:
            return MEMORY_ALLOCATION
        buf = ctypes.create_string_buffer(n)
        out.value = ctypes.addressof(buf)
        self.live[out.value] = buf
        return SUCCESS

    def cudaFree(self, ptr):
        p = _arg_type(ptr, ctypes.c_void_p, "cudaFree")
        self._log("cudaFree", ptr=p)
        if p in self.fail_free or p not in self.live:
            return INVALID_VALUE
        self.freed.append(self.live.pop(p))
        return SUCCESS

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        d, s = _arg_type(dst, ctypes.c_void_p, "dst") or 0, _arg_type(src, ctypes.c_void_p, "src") or 0
        n = _arg_type(count, ctypes.c_size_t, "count")
        k = _arg_type(kind, ctypes.c_int, "kind")
        st = _arg_type(stream, ctypes.c_void_p, "stream") or 0
        self._log("cudaMemcpyAsync", dst=d, src=s, count=n, kind=k, stream=st)
        dev_dst, dev_src = k in (H2D, D2D), k in (D2H, D2D)
        for ptr, on_device, side in ((d, dev_dst, "destination"), (s, dev_src, "source")):
            if (self.allocation(ptr, n) is not None) != on_device:
                self.violations.append(f"cudaMemcpyAsync kind {k}: {side} {ptr:#x} is not in "
                                       f"{'device' if on_device else 'host'} memory")
                return INVALID_VALUE

        def op():
            ctypes.memmove(d, s, n)
        op.kind = "memcpy"
        self.submit(st, op)
        return SUCCESS

    # -- streams and events ---------------------------------------------------------------------
    def cudaStreamCreate(self, stream):  # a blocking stream (cudaStreamDefault)
        return self.cudaStreamCreateWithFlags(stream, ctypes.c_uint(0))

    def cudaStreamCreateWithFlags(self, stream, flags):
        out = _out(stream, ctypes.c_void_p, "cudaStreamCreateWithFlags")
        f = _arg_type(flags, ctypes.c_uint, "flags")
        out.value = self._handle()
        self.streams[out.value] = {"flags": f, "capture": None, "owner": "backend"}
        self._log("cudaStreamCreateWithFlags", stream=out.value, flags=f)
        return SUCCESS

    def _stream(self, stream, what):
        h = _arg_type(stream, ctypes.c_void_p, what) or 0
        if h not in self.streams and h not in LEGACY_STREAMS:
            self.violations.append(f"{what} on unknown stream {h:#x}")
            return h, INVALID_HANDLE
        return h, SUCCESS

    def cudaStreamDestroy(self, stream):
        h, status = self._stream(stream, "cudaStreamDestroy")
        self._log("cudaStreamDestroy", stream=h)
        if status == SUCCESS:
            self.streams.pop(h)
        return status

    def cudaStreamSynchronize(self, stream):
        h, status = self._stream(stream, "cudaStreamSynchronize")
        self._log("cudaStreamSynchronize", stream=h)
        if self.capturing(h):
            self.violations.append("cudaStreamSynchronize on a capturing stream")
            return CAPTURE_ILLEGAL
        return status

    def cudaEventCreateWithFlags(self, event, flags):
        out = _out(event, ctypes.c_void_p, "cudaEventCreateWithFlags")
        out.value = self._handle()
        self.events[out.value] = _arg_type(flags, ctypes.c_uint, "flags")
        return SUCCESS

    def cudaEventDestroy(self, event):
        e = _arg_type(event, ctypes.c_void_p, "cudaEventDestroy")
        self._log("cudaEventDestroy", event=e)
        return SUCCESS if self.events.pop(e, None) is not None else INVALID_HANDLE

    def cudaEventRecord(self, event, stream):
        e = _arg_type(event, ctypes.c_void_p, "cudaEventRecord")
        h, status = self._stream(stream, "cudaEventRecord")
        self._log("cudaEventRecord", event=e, stream=h)
        return status if e in self.events else INVALID_HANDLE

    def cudaStreamWaitEvent(self, stream, event, flags):
        h, status = self._stream(stream, "cudaStreamWaitEvent")
        e = _arg_type(event, ctypes.c_void_p, "cudaStreamWaitEvent event")
        _arg_type(flags, ctypes.c_uint, "flags")
        self._log("cudaStreamWaitEvent", stream=h, event=e)
        return status if e in self.events else INVALID_HANDLE

    # -- CUDA graphs ----------------------------------------------------------------------------
    def cudaStreamBeginCapture(self, stream, mode):
        h, status = self._stream(stream, "cudaStreamBeginCapture")
        m = _arg_type(mode, ctypes.c_int, "mode")
        self._log("cudaStreamBeginCapture", stream=h, mode=m)
        if h in LEGACY_STREAMS:
            return CAPTURE_UNSUPPORTED
        if status == SUCCESS:
            self.streams[h]["capture"] = {"mode": m, "ops": []}
        return status

    def cudaStreamEndCapture(self, stream, graph):
        h, status = self._stream(stream, "cudaStreamEndCapture")
        out = _out(graph, ctypes.c_void_p, "cudaStreamEndCapture")
        capture = self.streams.get(h, {}).get("capture")
        self._log("cudaStreamEndCapture", stream=h)
        if capture is None:
            return CAPTURE_ILLEGAL
        self.streams[h]["capture"] = None
        out.value = self._handle()
        self.graphs[out.value] = dict(capture, stream=h, flags=self.streams[h]["flags"])
        return SUCCESS

    def cudaGraphInstantiateWithFlags(self, exe, graph, flags):
        out = _out(exe, ctypes.c_void_p, "cudaGraphInstantiateWithFlags")
        g = _arg_type(graph, ctypes.c_void_p, "graph")
        _arg_type(flags, ctypes.c_ulonglong, "flags")
        if g not in self.graphs:
            return INVALID_HANDLE
        out.value = self._handle()
        self.execs[out.value] = self.graphs[g]
        return SUCCESS

    def cudaGraphLaunch(self, exe, stream):
        x = _arg_type(exe, ctypes.c_void_p, "cudaGraphLaunch")
        h, status = self._stream(stream, "cudaGraphLaunch")
        self._log("cudaGraphLaunch", exe=x, stream=h)
        if x not in self.execs:
            return INVALID_HANDLE
        for op in self.execs[x]["ops"]:
            if getattr(op, "replay_check", None) is not None:
                op.replay_check()
            op()
        return status

    def cudaGraphExecDestroy(self, exe):
        x = _arg_type(exe, ctypes.c_void_p, "cudaGraphExecDestroy")
        self._log("cudaGraphExecDestroy", exe=x)
        return SUCCESS if self.execs.pop(x, None) is not None else INVALID_HANDLE

    def cudaGraphDestroy(self, graph):
        g = _arg_type(graph, ctypes.c_void_p, "cudaGraphDestroy")
        self._log("cudaGraphDestroy", graph=g)
        return SUCCESS if g in self.graphs else INVALID_HANDLE
