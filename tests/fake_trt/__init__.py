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
import os
import types

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tensorrt_api.json")
with open(DATA, encoding="utf-8") as _f:
    API = json.load(_f)["versions"]
VERSIONS = tuple(API)
DTYPES = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
          "uint8": "UINT8", "fp8": "FP8", "bfloat16": "BF16", "int4": "INT4", "fp4": "FP4", "e8m0": "E8M0"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64"}


class Fake:
    """The state of one fake TensorRT "process": its names, and everything recorded."""

    def __init__(self, key, cudart):
        entry = API[key]
        self.key, self.version, self.cudart = key, entry["version"], cudart
        self.major = int(self.version.split(".")[0])
        self.methods = {c: set(v["methods"]) for c, v in entry["classes"].items()}
        self.properties = {c: set(v["properties"]) for c, v in entry["classes"].items()}
        self.enums = entry["enums"]
        self.calls, self.touched, self.violations = [], set(), []
        self.plugins_registered = False

    def record(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return call

    def names(self, prefix):
        return [c[0] for c in self.calls if c[0].startswith(prefix)]


class _Meta(type):
    def __call__(cls, *args, **kwargs):
        fake = cls._fake
        if "__init__" not in fake.methods[cls._api_name]:
            raise TypeError(f"tensorrt.{cls._api_name}: No constructor defined!")
        fake.calls.append((cls._api_name + ".__init__", args, kwargs))
        return super().__call__(*args, **kwargs)


def _new(cls, *args):
    """An instance made inside TensorRT (classes without a Python constructor)."""
    obj = object.__new__(cls)
    cls.__init__(obj, *args)
    return obj


class Bound(metaclass=_Meta):
    """Base of the fake bound classes: only the version's members are reachable."""

    _fake = _api_name = None

    def __getattribute__(self, name):
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        fake, cls = type(self)._fake, type(self)._api_name
        if name not in fake.methods[cls] and name not in fake.properties[cls]:
            raise AttributeError(f"'tensorrt.{cls}' object has no attribute '{name}' (TensorRT {fake.version})")
        fake.touched.add(f"{cls}.{name}")
        try:
            value = object.__getattribute__(self, name)
        except AttributeError:
            raise NotImplementedError(f"the fake tensorrt does not implement {cls}.{name}")
        return fake.record(f"{cls}.{name}", value) if name in fake.methods[cls] else value

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            fake, cls = type(self)._fake, type(self)._api_name
            if name not in fake.properties[cls]:
                raise AttributeError(f"'tensorrt.{cls}' object has no attribute '{name}' (TensorRT {fake.version})")
            fake.touched.add(f"{cls}.{name}")
            fake.calls.append((f"{cls}.{name}=", (value,), {}))
        object.__setattr__(self, name, value)


class EnumValue:
    def __init__(self, enum, name, value):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, EnumValue) and (self.enum, self.name) == (other.enum, other.name)

    def __hash__(self):
        return hash((self.enum, self.name))

    def __repr__(self):
        return f"<{self.enum}.{self.name}: {self.value}>"


def _enum(fake, qualified):
    values = fake.enums[qualified]
    short = qualified.split(".")[-1]

    class Meta(type):
        def __getattribute__(cls, name):
            value = type.__getattribute__(cls, name)
            if not name.startswith("_"):
                fake.touched.add(f"{qualified}.{name}")
            return value

    members = {v: EnumValue(short, v, i) for i, v in enumerate(values)}
    return Meta(short, (), dict(members, __members__=members))


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


class ITensor(Bound):
    def __init__(self, name, dtype):
        self._name, self._dtype = name, dtype

    @property
    def name(self):
        return self._name

    @property
    def dtype(self):
        return self._dtype


class ILayer(Bound):
    def __init__(self, name, kind, inputs, outputs):
        self._name, self._kind, self._inputs, self._outputs = name, kind, inputs, outputs
        self._precision, self._output_types = None, {}

    name = property(lambda self: self._name)
    type = property(lambda self: self._kind)
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]

    @property
    def precision(self):
        return self._precision if self._precision is not None else self._trt.float32

    @precision.setter
    def precision(self, value):
        self._precision = value

    def set_output_type(self, index, dtype):
        self._output_types[index] = dtype


class INetworkDefinition(Bound):
    def __init__(self, flags):
        self._flags, self._inputs, self._layers, self._outputs = flags, [], [], []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_layer(self, index):
        return self._layers[index]

    def get_output(self, index):
        return self._outputs[index]

    def _has(self, flag):
        enum = self._trt.NetworkDefinitionCreationFlag
        if flag not in self._fake.enums["NetworkDefinitionCreationFlag"]:
            return False
        return bool(self._flags & (1 << int(getattr(enum, flag))))


class Builder(Bound):
    def __init__(self, logger):
        self._logger = logger

    def create_network(self, flags=0):
        return _new(self._trt.INetworkDefinition, flags)


class OnnxParser(Bound):
    """Parses a step graph into layers: one per ONNX node, typed as the TensorRT version would."""

    def __init__(self, network, logger):
        self._network, self._logger, self._errors, self._path = network, logger, [], None
        native = self._fake.major >= 10  # NATIVE_INSTANCENORM: off by default on 8.6, on from 10.0
        self._flags = (1 << int(self._trt.OnnxParserFlag.NATIVE_INSTANCENORM)) if native else 0

    @property
    def flags(self):
        return self._flags

    @flags.setter
    def flags(self, value):
        self._flags = int(value)

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, path):
        import onnx

        trt, fake, net = self._trt, self._fake, self._network
        if fake.major < 10 and not net._has("EXPLICIT_BATCH"):
            self._errors.append("the ONNX parser needs an explicit-batch network")
            return False
        typed = fake.major >= 11 or net._has("STRONGLY_TYPED")
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        onnx_types = {v.name: v.type.tensor_type.elem_type
                      for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}

        def dtype(name):
            kind = ONNX_TYPES.get(onnx_types.get(name), "FLOAT")
            if kind == "INT64" and fake.major < 10:
                kind = "INT32"  # TensorRT 8 casts int64 inputs to int32
            elif kind == "HALF" and not typed:
                kind = "FLOAT"  # weakly typed: the builder decides (NVIDIA/TensorRT#1993)
            return getattr(trt.DataType, kind)

        tensors = {v.name: _new(trt.ITensor, v.name, dtype(v.name)) for v in model.graph.input}
        net._inputs = list(tensors.values())
        native = "OnnxParserFlag" in fake.enums and bool(
            self._flags & (1 << int(trt.OnnxParserFlag.NATIVE_INSTANCENORM)))
        kinds = {"Cast": "CAST" if "CAST" in fake.enums["LayerType"] else "IDENTITY", "Shape": "SHAPE",
                 "Constant": "CONSTANT", "Reshape": "SHUFFLE", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE",
                 "Div": "ELEMENTWISE", "InstanceNormalization": "NORMALIZATION" if native else "PLUGIN_V2"}
        for node in model.graph.node:
            outs = [_new(trt.ITensor, o, dtype(o)) for o in node.output]
            tensors.update({t.name: t for t in outs})
            layer = _new(trt.ILayer, node.name, getattr(trt.LayerType, kinds[node.op_type]),
                               [tensors.get(i) for i in node.input], outs)
            net._layers.append(layer)
        net._outputs = [tensors[o.name] for o in model.graph.output]
        self._path = os.path.abspath(path)
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
