"""What installing bdm puts on the import path: only names that start with ``bdm``, each module once.

The folders ``runtime/`` and ``export/`` install as ``bdm_runtime`` and ``bdm_export`` (setup.cfg
``package_dir``). Checked three ways: the wheel a plain ``pip install .`` would install (built
from a copy of the sources), the editable install ``make`` made (imported from outside the
repository), and a process that imports every module (none loads twice under two names).
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"bdm_runtime": "runtime", "bdm_export": "export", "bdm_train": "bdm_train"}  # import name -> folder


def _python(code, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def _sources():
    """``{installed path: repo path}`` of every .py file of the three packages."""
    out = {}
    for name, folder in FOLDERS.items():
        for here, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(here, f), os.path.join(ROOT, folder))
                    out[f"{name}/{rel.replace(os.sep, '/')}"] = os.path.join(folder, rel)
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of a copy of the sources (setuptools' PEP 517 backend, no network, ~1 s)."""
    pytest.importorskip("setuptools.build_meta")
    src = tmp_path_factory.mktemp("src")
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src)
    for folder in FOLDERS.values():
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-c", f"import setuptools.build_meta as b; print(b.build_wheel({str(out)!r}))"],
                       cwd=src, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "bdist_wheel" in r.stderr:
        pytest.skip("this setuptools cannot build wheels without the wheel package")
    assert r.returncode == 0, r.stderr
    return out / r.stdout.strip().splitlines()[-1]


def test_wheel_installs_only_bdm_names_and_every_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == set(FOLDERS), top  # bdm_runtime, bdm_export, bdm_train: nothing named runtime or export
    # Every module of the folders is in it (a subpackage missing from setup.cfg's list would not be).
    assert {n for n in names if n.endswith(".py")} == set(_sources())
    scripts = dict(line.split(" = ") for line in entry_points.splitlines() if " = " in line)
    # The CPU and CUDA builds of ONNX Runtime install the same module: one extra each, none has both.
    extras = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" in line:
            req, extra = line[len("Requires-Dist:"):].split(";")
            extras.setdefault(extra.split("==")[1].strip().strip("'\""), set()).add(req.split(">")[0].strip())
    assert "onnxruntime" in extras["ort"] and "onnxruntime-gpu" in extras["ort-gpu"], extras
    assert not any({"onnxruntime", "onnxruntime-gpu"} <= reqs for reqs in extras.values()), extras
    assert set(scripts) == {"bdm-train", "bdm-sample", "bdm-export", "bdm-run", "bdm-serve"}
    assert all(target.split(".")[0] in FOLDERS for target in scripts.values()), scripts


def test_installed_distribution_names():
    """The distribution ``make install`` installed declares only bdm names, and its scripts import them."""
    dist = importlib.metadata.distribution("bdm")
    top = (dist.read_text("top_level.txt") or "").split()
    assert top and all(name.startswith("bdm") for name in top), top
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts and all(v.split(".")[0] in FOLDERS for v in scripts.values()), scripts


def test_editable_install_imports_from_outside_the_repository(tmp_path):
    """From any folder the installed names resolve to this checkout, and the bare folder names do not exist."""
    code = ("import importlib.util, json, bdm_runtime, bdm_export, bdm_train\n"
            "print(json.dumps({'files': [m.__file__ for m in (bdm_runtime, bdm_export, bdm_train)],\n"
            "                  'bare': [importlib.util.find_spec(n) is not None for n in ('runtime', 'export')]}))")
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = [os.path.join(ROOT, folder, "__init__.py") for folder in FOLDERS.values()]
    assert [os.path.realpath(f) for f in out["files"]] == [os.path.realpath(f) for f in want]
    assert out["bare"] == [False, False]


def test_no_module_loads_twice():
    """Import every module of the three packages from the repository root (where the folders' bare names
    are on the path): none is loaded twice under two names, and a bare import is refused, naming the fix."""
    code = """
import json, pkgutil, sys
import bdm_runtime, bdm_export, bdm_train
for pkg in (bdm_runtime, bdm_export, bdm_train):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        __import__(m.name)
refused = {}
for bare in ("runtime", "export", "runtime.sampler"):
    try:
        __import__(bare)
        refused[bare] = None
    except ImportError as e:
        refused[bare] = str(e)
files = {}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f and name.split(".")[0] in ("bdm_runtime", "bdm_export", "bdm_train", "runtime", "export"):
        files.setdefault(f, []).append(name)
print(json.dumps({"files": files, "refused": refused}))
"""
    r = _python(f"import sys; sys.path.insert(0, {ROOT!r})\n" + code, ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["files"]) >= len(_sources())  # every module was imported
    twice = {f: names for f, names in out["files"].items() if len(names) > 1}
    assert not twice, twice
    assert all(names[0].startswith("bdm") for names in out["files"].values())
    for bare, message in out["refused"].items():
        assert message and "import bdm_" in message, (bare, message)
