"""Write ``tests/data/tensorrt_api.json``: the part of the TensorRT Python API the fake needs, per version.

Run once from the full API listing (``tensorrt-api.json``: every class, method, property, enum
value and module function of NVIDIA's Python bindings at tags 8.5.3, v8.6.1, v10.0.1, v10.3.0,
v10.16 and v11.1, read from NVIDIA/TensorRT's ``python/src``):

    python tests/fake_trt/extract_api.py PATH/TO/tensorrt-api.json > tests/data/tensorrt_api.json

For every class and enum below it keeps the version's *complete* member list, so a name this
code (or Polygraphy's loaders it runs) touches is either there or absent exactly as in that
TensorRT. A class or enum not listed here is absent from the fake altogether: touching one fails
every version, and it must then be added here.
"""
import json
import sys

CLASSES = ("Runtime", "ICudaEngine", "IExecutionContext", "ILogger", "Logger", "Builder",
           "INetworkDefinition", "OnnxParser", "ILayer", "ITensor")
ENUMS = ("TensorIOMode", "DataType", "OnnxParserFlag", "NetworkDefinitionCreationFlag", "BuilderFlag",
         "MemoryPoolType", "LayerType", "ILogger.Severity")
HELPERS = ("nptype", "volume")           # functions of the package's pure-Python __init__.py
NOT_DTYPES = ("ResizeMode", "SliceMode", "_plugin_registry")  # module attributes that are not DataType aliases
# The __version__ each fake reports (the tag read, as a wheel would spell it).
VERSIONS = {"8.5": "8.5.3.1", "8.6": "8.6.1.6", "10.0": "10.0.1.6", "10.3": "10.3.0.26",
            "10.x-latest": "10.16.0.72", "11.x": "11.1.0.106"}


def _class(entry, name):
    c = entry["classes"][name]
    patches = entry["python_helpers"]["class_patches"].get(name, [])
    methods = c["methods"] + c.get("inherited_methods", [])
    properties = c["properties"] + c.get("inherited_properties", []) + [p for p in patches if p not in methods]
    for enum, scope in entry.get("enum_values_exported_to", {}).items():
        if scope == name:
            properties += entry["enums"][enum]
    return {"methods": sorted(set(methods)), "properties": sorted(set(properties) - set(methods))}


def subset(full):
    out = {}
    for key, entry in full["versions"].items():
        classes = {name: _class(entry, name) for name in CLASSES}
        enums = {name: entry["enums"][name] for name in ENUMS if name in entry["enums"]}
        dtypes = sorted(a for a in entry["module_attributes"] if a not in NOT_DTYPES)
        helpers = [h for h in HELPERS if h in entry["python_helpers"]["functions"]]
        functions = sorted(entry["module_functions"]) + helpers
        out[key] = {"tag": entry["tag"], "version": VERSIONS[key], "classes": classes, "enums": enums,
                    "functions": functions, "dtypes": dtypes}
    return {"source": "subset of tensorrt-api.json, written by tests/fake_trt/extract_api.py; " + full["source"],
            "versions": out}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        json.dump(subset(json.load(f)), sys.stdout, indent=None, separators=(",", ":"), sort_keys=True)
        sys.stdout.write("\n")
