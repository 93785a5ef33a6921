"""The machinery of the fake ``tensorrt``: per-version names, restricted objects, enums, records."""
import json
import os

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tensorrt_api.json")
with open(DATA, encoding="utf-8") as _f:
    API = json.load(_f)["versions"]
VERSIONS = tuple(API)
DTYPES = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
          "uint8": "UINT8", "fp8": "FP8", "bfloat16": "BF16", "int4": "INT4", "fp4": "FP4", "e8m0": "E8M0"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 3: "INT8"}


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
