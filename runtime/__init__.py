"""bdm runtime: the reverse sampling loop with numpy and one inference backend, no torch.

Nothing happens at import time: backends (ONNX Runtime, TensorRT) are imported when a model is
loaded. ``runtime.load(path)`` returns a :class:`runtime.sampler.Sampler`.
"""

__version__ = "0.1.0"


def load(path, backend="auto", **kwargs):
    """Open a bdm step graph (``.onnx``) or TensorRT engine (``.plan``) as a :class:`Sampler`."""
    from .sampler import load as _load

    return _load(path, backend=backend, **kwargs)


def __getattr__(name):  # lazy, so that ``import runtime`` stays cheap (PEP 562)
    if name == "Sampler":
        from .sampler import Sampler

        return Sampler
    if name == "BdmError":
        from .errors import BdmError

        return BdmError
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
