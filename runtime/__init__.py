"""bdm runtime: the reverse sampling loop with numpy and one inference backend, no torch.

Nothing happens at import time: backends (ONNX Runtime, TensorRT) are imported when a model is
loaded. ``bdm_runtime.load(path)`` returns a :class:`bdm_runtime.sampler.Sampler`.
"""

__version__ = "0.1.0"

# The folder is runtime/, the package is bdm_runtime (setup.cfg package_dir): imported under the
# folder's name (from the repository root) every module would load a second time, as another object.
if __name__ != "bdm_runtime":
    raise ImportError(f"import bdm_runtime, not {__name__} (the folder runtime/ installs as bdm_runtime)",
                      name=__name__)


def load(path, backend="auto", **kwargs):
    """Open a bdm step graph (``.onnx``) or TensorRT engine (``.plan``) as a :class:`Sampler`."""
    from .sampler import load as _load

    return _load(path, backend=backend, **kwargs)


def __getattr__(name):  # lazy, so that ``import bdm_runtime`` stays cheap (PEP 562)
    if name == "Sampler":
        from .sampler import Sampler

        return Sampler
    if name == "BdmError":
        from .errors import BdmError

        return BdmError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
