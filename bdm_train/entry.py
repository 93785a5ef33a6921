"""Console entry points of bdm_train: where torch is missing they fail in one line, not a traceback.

torch is looked for, not imported: the commands import it only when they run, so ``--help`` answers
without loading it (tests/test_runtime_notorch.py checks this).
"""
import importlib
import importlib.util
import sys


def _main(module):
    try:
        if importlib.util.find_spec("torch") is None:  # every bdm_train command needs it
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
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
