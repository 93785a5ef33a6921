"""bdm export: one whole sampler step as an ONNX graph (``export_onnx``) and TensorRT engines.

Lazy (PEP 562): ``import export`` and ``from export.trt import build_engine`` do not import torch,
so that engines can be built on a target without it (a Jetson). ``export_onnx`` needs torch.
"""

__all__ = ["export_onnx", "build_graph", "read_metadata", "StepGraph", "build_engine", "check_onnx"]

# bdm-export --check: an element fails when it differs by more than ATOL and by more than
# RTOL * |reference| (Polygraphy CompareFunc.simple, elemwise); outputs are O(1) latents/images.
CHECK_TOLERANCES = {
    "fp32": (1e-4, 1e-4),  # FP32 graph vs torch FP32: same formulas, other kernels (measured ~1e-6)
    "fp16": (3e-2, 3e-2),  # FP16 graph vs torch's FP16 model: float16 rounding in another order (~1e-3)
}

_WHERE = {
    "export_onnx": "onnx_export",
    "build_graph": "onnx_export",
    "read_metadata": "onnx_export",
    "StepGraph": "step",
    "build_engine": "trt",
    "check_onnx": "check",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module("." + _WHERE[name], __name__), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
