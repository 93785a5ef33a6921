"""bdm export (installed as ``bdm_export``): one whole sampler step as an ONNX graph (``export_onnx``).

Lazy (PEP 562): ``import bdm_export`` does not import torch, so that ``bdm-export --onnx X --out
Y.plan`` builds engines on a target without it (a Jetson). The engine builder itself lives in the
runtime (``bdm_runtime.trt_build``), because it runs on the target; ``export_onnx`` needs torch.
"""

# The folder is export/, the package is bdm_export (setup.cfg package_dir): see bdm_runtime/__init__.py.
if __name__ != "bdm_export":
    raise ImportError(f"import bdm_export, not {__name__} (the folder export/ installs as bdm_export)",
                      name=__name__)

__all__ = ["export_onnx", "build_graph", "read_metadata", "StepGraph", "check_onnx"]

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
    "check_onnx": "check",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module("." + _WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
