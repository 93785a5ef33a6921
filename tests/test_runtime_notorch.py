"""The runtime ships without torch: ``import bdm_runtime`` is light, and a whole ``bdm-run`` never touches torch.

Both run in a fresh interpreter (this test process has torch loaded for the export). The second
one installs an import hook that makes ``torch`` (and the training/export packages) unimportable,
so an indirect import fails loudly instead of merely showing up in ``sys.modules``.
"""
import json
import os
import subprocess
import sys

import pytest
from helpers import export_mixture
import torch

pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    BLOCKED = {"torch", "bdm_train", "bdm_export", "onnx", "onnxscript", "tensorrt", "polygraphy"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError("blocked in this test: " + name)
        return None
sys.meta_path.insert(0, _Block())
'''


def _python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_runtime_imports_nothing_heavy():
    code = ("import json, sys; before = set(sys.modules); import bdm_runtime; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)
    heavy = {"numpy", "torch", "onnxruntime", "onnx", "tensorrt", "polygraphy", "PIL", "click", "tqdm",
             "bdm_train", "bdm_export"}
    assert not {m.split(".")[0] for m in new} & heavy, new
    assert [m for m in new if m.startswith("bdm")] == ["bdm_runtime"], new  # no submodule, no other bdm package


@pytest.fixture(scope="module")
def mixture_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    return export_mixture(tmp_path_factory.mktemp("mix"), default_steps=6)[0]


def test_bdm_run_through_onnx_runtime_without_torch(mixture_onnx, tmp_path):
    args = ["--engine", mixture_onnx, "--n", 4, "--quiet", "--out", tmp_path / "g.png",
            "--out-dir", tmp_path / "imgs", "--npz", tmp_path / "s.npz"]
    code = BLOCKER + (
        "import json\n"
        "from bdm_runtime.cli import main\n"
        "try:\n"
        f"    main({json.dumps([str(a) for a in args])})\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted(sys.modules)))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    top = {m.split(".")[0] for m in modules}
    assert "torch" not in top and "bdm_train" not in top and "bdm_export" not in top
    assert "onnx" not in top  # metadata came from bdm_runtime.onnx_meta, not the onnx package
    assert "onnxruntime" in top  # it really ran through ONNX Runtime
    assert (tmp_path / "g.png").exists() and (tmp_path / "s.npz").exists() and len(os.listdir(tmp_path / "imgs")) == 4


TORCH_BLOCKER = '''
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return None
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.mark.parametrize("entry", ["train", "sample"])
def test_training_commands_without_torch_fail_in_one_line(entry):
    """A deployment install (no torch) that runs bdm-train or bdm-sample gets one line naming the fix."""
    proc = _python(TORCH_BLOCKER + f"import sys; sys.argv = ['bdm-{entry}', '--help']\n"
                   f"from bdm_train.entry import {entry}; {entry}()")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: missing dependency torch"), proc.stderr
    assert "torch==2.13.0" in proc.stderr  # the CPU build, never an unpinned (multi-GB CUDA) torch


@pytest.mark.parametrize("entry", ["train", "sample"])
def test_training_commands_help_without_importing_torch(entry):
    """``bdm-train --help`` and ``bdm-sample --help`` answer without loading torch (it costs seconds)."""
    proc = _python(f"import sys; sys.argv = ['bdm-{entry}', '--help']\n"
                   f"from bdm_train.entry import {entry}\n"
                   f"try:\n    {entry}()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                   "print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: bdm-" + entry in proc.stdout and proc.stdout.strip().endswith("False"), proc.stdout
