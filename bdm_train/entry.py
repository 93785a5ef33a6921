"""Console entry points of bdm_train: where torch is missing they fail in one line, not a traceback."""
import importlib
import sys


def _main(module):
    try:
        import torch  # noqa: F401  (every bdm_train command needs it)
    except ImportError as e:
        from bdm_runtime.errors import describe_import_error

        print("Error: " + describe_import_error(e), file=sys.stderr)
        sys.exit(1)
    importlib.import_module("bdm_train." + module).main()


def train():
    """``bdm-train``."""
    _main("train")


def sample():
    """``bdm-sample``."""
    _main("sample_cli")
