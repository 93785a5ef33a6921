"""A fake ``tensorrt`` module per TensorRT version, built from the bindings' own name lists.

``make_tensorrt(key, cudart)`` returns a module that exposes exactly the names of TensorRT
``key`` (one of :data:`VERSIONS`) for the classes, enums and functions of
``tests/data/tensorrt_api.json`` (see ``extract_api.py``): an absent name raises
``AttributeError`` as the real module would; a present name the fake does not implement raises
``NotImplementedError``. Every call is recorded in ``module._fake.calls`` and every name read in
``module._fake.touched``.

What it models (the behaviour the TensorRT backend and the engine builder depend on):

- plugins: an engine whose network holds the ``InstanceNormalization_TRT`` plugin deserializes
  only after ``init_libnvinfer_plugins`` ran in this "process" (this module object); the ONNX
  parser makes that plugin on 8.5 always, on 8.6 unless ``OnnxParserFlag.NATIVE_INSTANCENORM``
  is set (off by default there, on from 10.0);
- networks: 8.x needs ``EXPLICIT_BATCH`` and is weakly typed (its float tensors report FLOAT);
  10.x is strongly typed with ``STRONGLY_TYPED``, 11.x always;
- execution: ``execute_async_v3`` runs the engine's ONNX graph with ONNX Runtime on the fake
  device memory at the bound addresses and shapes; on a capturing stream it is recorded instead,
  refused right after a shape change, and a replayed graph checks that its context had a plain
  enqueue since the last ``set_input_shape``.

Engines are JSON (written by the tests' stand-in for Polygraphy's ``EngineBytesFromNetwork``).
"""
import json
import types

import numpy as np

from .builder import Builder, ILayer, INetworkDefinition, ITensor, OnnxParser
from .core import API, DTYPES, NUMPY, VERSIONS, Bound, Fake, _enum, _Meta, _new  # noqa: F401


# -- the classes ---------------------------------------------------------------------------------
class Runtime(Bound):
    def __init__(self, logger):
        self._logger = logger

    def deserialize_cuda_engine(self, data):
        spec = json.loads(bytes(data).decode())
        fake = self._fake
        if spec["version"] != fake.version:
            self._logger.log(self._trt.Logger.ERROR, "engine built by another TensorRT")
            return None
        missing = [p for p in spec["plugins"] if not fake.plugins_registered]
        if missing:  # what TensorRT says when a plugin creator is not registered
            self._logger.log(self._trt.Logger.ERROR, f"getPluginCreator could not find plugin {missing[0]} version 1")
            return None
        return _new(self._trt.ICudaEngine, spec)


class ICudaEngine(Bound):
    def __init__(self, spec):
        self._spec = spec
        self._names = list(spec["inputs"]) + list(spec["outputs"])
        self._session = None

    @property
    def num_io_tensors(self):
        return len(self._names)

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        mode = self._trt.TensorIOMode
        if name in self._spec["inputs"]:
            return mode.INPUT
        return mode.OUTPUT if name in self._spec["outputs"] else mode.NONE

    def get_tensor_dtype(self, name):
        return getattr(self._trt.DataType, self._spec["inputs"].get(name, "FLOAT"))

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return [tuple(s) for s in self._spec["profile"][name]]

    def create_execution_context(self, *args):
        return _new(self._trt.IExecutionContext, self)

    def _run(self, feed):
        if self._session is None:
            import onnxruntime

            self._session = onnxruntime.InferenceSession(self._spec["onnx"], providers=["CPUExecutionProvider"])
        return dict(zip(self._spec["outputs"], self._session.run(self._spec["outputs"], feed)))


class IExecutionContext(Bound):
    def __init__(self, engine):
        self._engine, self._shapes, self._addresses, self._dirty = engine, {}, {}, False

    def set_input_shape(self, name, shape):
        lo, _, hi = self._engine._spec["profile"].get(name, [[1], [1], [1]])
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        if self._shapes.get(name) != shape:
            self._shapes[name], self._dirty = shape, True
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self._engine._names or name in self._fake_refuse or self._fake.cudart.allocation(ptr, 1) is None:
            return False
        self._addresses[name] = int(ptr)
        return True

    _fake_refuse = ()

    def execute_async_v3(self, stream_handle):
        spec, cudart, fake = self._engine._spec, self._fake.cudart, self._fake
        if set(self._shapes) != set(spec["inputs"]) or set(self._addresses) != set(self._engine._names):
            return False
        if cudart.capturing(stream_handle) and self._dirty:
            fake.violations.append("execute_async_v3 captured right after set_input_shape (no plain enqueue)")
            return False
        shapes, addresses = dict(self._shapes), dict(self._addresses)
        batch = shapes["z"][0]

        def op():
            feed = {}
            for name, dtype in spec["inputs"].items():
                kind = np.dtype(NUMPY[dtype])
                n = int(np.prod(shapes[name]))
                host = np.frombuffer(cudart.view(addresses[name], n * kind.itemsize), kind).reshape(shapes[name])
                feed[name] = host.astype(np.int64) if name == "label" else host.copy()
            for name, value in self._engine._run(feed).items():
                assert value.shape[0] == batch
                out = np.ascontiguousarray(value, np.float32)
                cudart.view(addresses[name], out.nbytes)[:] = out.tobytes()

        def replay_check():
            if self._dirty:
                fake.violations.append("CUDA graph replayed after set_input_shape without a plain enqueue")
        op.kind, op.context, op.replay_check = "execute_async_v3", self, replay_check
        if not cudart.submit(stream_handle, op):
            self._dirty = False
        return True


class ILogger:
    """Subclassable, as the binding's trampoline class is (Polygraphy's logger derives from it)."""

    def __init__(self):
        pass


def _nptype(fake):
    def nptype(dt):
        if dt.name == "INT64" and fake.major < 10:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        if dt.name not in NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY[dt.name]
    return nptype


def _plugins(fake):
    def init_libnvinfer_plugins(logger, namespace):
        fake.plugins_registered = True
        return True
    return init_libnvinfer_plugins


class _Module(types.ModuleType):
    def __getattribute__(self, name):
        value = types.ModuleType.__getattribute__(self, name)
        if not name.startswith("_"):
            types.ModuleType.__getattribute__(self, "_fake").touched.add(name)
        return value


def make_tensorrt(key, cudart):
    """The fake ``tensorrt`` module of version ``key`` on the fake CUDA runtime ``cudart``."""
    fake = Fake(key, cudart)
    trt = _Module("tensorrt")
    trt.__file__ = __file__
    trt._fake = fake
    trt.__version__ = fake.version
    for qualified in fake.enums:
        if "." not in qualified:
            setattr(trt, qualified, _enum(fake, qualified))
    for cls in (Runtime, ICudaEngine, IExecutionContext, ITensor, ILayer, INetworkDefinition, Builder, OnnxParser):
        setattr(trt, cls.__name__, _Meta(cls.__name__, (cls,), {"_fake": fake, "_api_name": cls.__name__, "_trt": trt}))
    severity = _enum(fake, "ILogger.Severity")
    levels = {v: getattr(severity, v) for v in fake.enums["ILogger.Severity"]}
    trt.ILogger = type("ILogger", (ILogger,), dict(levels, Severity=severity))

    def logger_init(self, min_severity=None):
        fake.calls.append(("Logger.__init__", (min_severity,), {}))
    trt.Logger = type("Logger", (trt.ILogger,), {"__init__": logger_init, "log": lambda self, severity, msg: None})
    for alias in API[key]["dtypes"]:
        setattr(trt, alias, getattr(trt.DataType, DTYPES[alias]))
    implemented = {"init_libnvinfer_plugins": _plugins(fake), "nptype": _nptype(fake),
                   "volume": lambda shape: int(np.prod(shape))}
    for name in API[key]["functions"]:
        fn = implemented.get(name)
        if fn is None:
            def fn(*args, _name=name, **kwargs):
                raise NotImplementedError(f"the fake tensorrt does not implement {_name}")
        setattr(trt, name, fake.record(name, fn))
    return trt
