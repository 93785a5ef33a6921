"""The layers, enforced (an import-linter contract written as a test, no extra dependency).

Every ``import`` in the repository is read with ``ast`` (module level and inside functions alike:
a lazy import is still a dependency) and checked against the layering docs/layout.md describes:

- ``bdm_runtime`` (folder ``runtime/``) is the base: the standard library, numpy, click, Pillow,
  tqdm and the inference libraries it drives; never torch, onnx, training, export or benchmarks;
- ``bdm_train`` uses only the runtime's torch-free core (noise protocol, errors, files, labels, images, cpu);
- ``bdm_export`` (folder ``export/``) builds on training and the runtime;
- nothing but tests and benchmarks themselves imports ``benchmarks``, and benchmarks import no
  private (``_name``) object or module of the packages;
- nobody imports the folders' bare names ``runtime`` / ``export``;
- the module graph of the three packages has no cycle.

Each rule is also checked against a deliberately bad import, so a rule that could never fail is caught.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"runtime": "bdm_runtime", "export": "bdm_export", "bdm_train": "bdm_train"}  # folder -> import name
SCANNED = ("runtime", "export", "bdm_train", "benchmarks", "examples", "tests")
OURS = ("bdm_runtime", "bdm_export", "bdm_train", "benchmarks")

# What the runtime may import besides the standard library: its install_requires and the
# inference libraries of the [ort], [trt] and [openvino] extras (setup.cfg).
RUNTIME_THIRD_PARTY = {"numpy", "click", "PIL", "tqdm", "onnxruntime", "tensorrt", "polygraphy", "openvino",
                       "pytriton", "triton_python_backend_utils"}  # the last two: bdm-serve ([serve])
# The runtime's torch-free core, all that training may use of it.
RUNTIME_CORE = {"bdm_runtime", "bdm_runtime.errors", "bdm_runtime.io", "bdm_runtime.labels",
                "bdm_runtime.noise", "bdm_runtime.images", "bdm_runtime.format",
                "bdm_runtime.grids", "bdm_runtime.limits", "bdm_runtime.cpu"}


def module_name(rel):
    """``runtime/backends/trt.py`` -> ``bdm_runtime.backends.trt`` (the name it is imported by)."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    parts[0] = PACKAGES.get(parts[0], parts[0])
    return ".".join(parts)


def imports_of(source, module, is_package):
    """``[(lineno, imported module, imported names)]`` of ``source``, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            out.append((node.lineno, base, tuple(a.name for a in node.names)))
    return out


def scan():
    """``{module: (path, [(lineno, target, names)])}`` for every .py file of SCANNED."""
    found = {}
    for top in SCANNED:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    rel = os.path.relpath(path, ROOT)
                    with open(path, encoding="utf-8") as fh:
                        source = fh.read()
                    mod = module_name(rel)
                    found[mod] = (rel, imports_of(source, mod, f == "__init__.py"))
    return found


def targets(target, names, known):
    """The modules an import reaches: ``from a import b`` is module ``a.b`` when that is a module
    (and ``a`` itself only when some name is not a module: ``a``'s own content is then used)."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs if names and len(subs) == len(names) else [target] + subs


def violations(found):
    """Every import that breaks a layer rule, as ``"path:line: module imports target (rule)"``."""
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for mod, (rel, imps) in sorted(found.items()):
        layer = mod.split(".")[0]
        for line, target, names in imps:
            top = target.split(".")[0]
            where = f"{rel}:{line}: {mod} imports {target}"
            if top in ("runtime", "export"):
                bad.append(f"{where} (a folder's bare name: import bdm_{top})")
            if top == "benchmarks" and layer not in ("benchmarks", "tests"):
                bad.append(f"{where} (nothing outside benchmarks imports benchmarks)")
            if layer == "bdm_runtime" and not (top == "bdm_runtime" or top in stdlib or top in RUNTIME_THIRD_PARTY):
                bad.append(f"{where} (the runtime imports only itself, the standard library and "
                           f"{', '.join(sorted(RUNTIME_THIRD_PARTY))})")
            if layer == "bdm_train" and top == "bdm_export":
                bad.append(f"{where} (training sits below export)")
            if layer == "bdm_train" and top == "bdm_runtime":
                for t in targets(target, names, found):
                    if t not in RUNTIME_CORE:
                        bad.append(f"{where} (training uses only the runtime's torch-free core: "
                                   f"{', '.join(sorted(RUNTIME_CORE))})")
            if layer == "benchmarks" and top in OURS[:3]:
                private = [p for p in target.split(".") + list(names) if p.startswith("_") and p != "__version__"]
                if private:
                    bad.append(f"{where} (benchmarks use public APIs only: {', '.join(private)})")
    return bad


def graph(found, prefixes=OURS[:3]):
    """``{module: {modules it imports}}`` among the three packages' own modules."""
    g = {}
    for mod, (_, imps) in found.items():
        if mod.split(".")[0] not in prefixes:
            continue
        edges = set()
        for _, target, names in imps:
            for t in targets(target, names, found):
                if t in found and t != mod:
                    edges.add(t)
        g[mod] = edges
    return g


def find_cycle(g):
    """One cycle of ``g`` as a list of nodes, or ``None`` (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(g, WHITE)
    for start in sorted(g):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(g[start])))]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
            elif color.get(nxt, BLACK) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(nxt):] + [nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(g[nxt]))))
    return None


@pytest.fixture(scope="module")
def found():
    return scan()


def test_scan_sees_the_packages(found):
    """The scanner reads what it should (an empty scan would pass every rule)."""
    assert {"bdm_runtime.sampler", "bdm_runtime.trt_build", "bdm_export.cli", "bdm_train.train"} <= set(found)
    _, imps = found["bdm_runtime.sampler"]
    assert any(t == "bdm_runtime.noise" for _, t, _ in imps)  # ``from .noise import ...`` resolved


def test_layers_hold(found):
    assert violations(found) == []


def test_no_import_cycle(found):
    """Neither between the three packages nor between any two of their modules (lazy imports included)."""
    packages = {p: set() for p in OURS[:3]}
    for mod, edges in graph(found).items():
        packages[mod.split(".")[0]] |= {e.split(".")[0] for e in edges} - {mod.split(".")[0]}
    assert find_cycle(packages) is None, packages
    assert find_cycle(graph(found)) is None


@pytest.mark.parametrize("mod,source,rule", [
    ("bdm_runtime.sampler", "import torch", "the runtime imports only"),
    ("bdm_runtime.backends.trt", "from bdm_export.cli import main", "the runtime imports only"),
    ("bdm_runtime.cli", "def f():\n    from bdm_train import sampling", "the runtime imports only"),  # lazy, too
    ("bdm_train.sample_cli", "from bdm_runtime.cli import main", "torch-free core"),
    ("bdm_train.sample_cli", "from bdm_runtime import sampler", "torch-free core"),
    ("bdm_train.sampling", "from bdm_export import step", "training sits below export"),
    ("bdm_export.cli", "import benchmarks.bench", "nothing outside benchmarks imports benchmarks"),
    ("benchmarks.study", "from bdm_runtime.io import _private", "public APIs only"),
    ("tests.test_x", "import runtime.cli", "bare name"),
    ("examples.embed", "from export import export_onnx", "bare name"),
])
def test_each_rule_bites(found, mod, source, rule):
    """A known-bad import added to a copy of the scan is reported under the expected rule."""
    is_package = mod.count(".") == 0
    bad = dict(found)
    rel, imps = bad.get(mod, (mod.replace(".", "/") + ".py", []))
    bad[mod] = (rel, imps + imports_of(source, mod, is_package))
    hits = violations(bad)
    assert hits and all(rule in h for h in hits), hits


def test_a_cycle_is_found(found):
    """The cycle check bites: the circle this layout removed (runtime backend -> builder -> sampler -> backend)."""
    g = graph(found)
    assert find_cycle(g) is None
    g["bdm_runtime.sampler"] = g["bdm_runtime.sampler"] | {"bdm_runtime.trt_build"}
    g["bdm_runtime.step_info"] = g["bdm_runtime.step_info"] | {"bdm_runtime.sampler"}
    cycle = find_cycle(g)
    assert cycle and cycle[0] == cycle[-1] and "bdm_runtime.sampler" in cycle
    g = graph(found)
    g["bdm_runtime.errors"] = g["bdm_runtime.errors"] | {"bdm_train.checkpoint"}  # also a layer breach
    assert find_cycle(g) is not None


# -- sizes (issue 10): a module a newcomer can read in one sitting, a function on one screen -------
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def sizes(root=ROOT, folders=("runtime", "export", "bdm_train", "benchmarks", "examples")):
    """``[(path, lines)]`` of modules and ``[(path:name, lines)]`` of functions (decorators excluded)."""
    modules, functions = [], []
    for folder in folders:
        for base, _, files in os.walk(os.path.join(root, folder)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(base, name)
                with open(path) as f:
                    source = f.read()
                rel = os.path.relpath(path, root)
                modules.append((rel, len(source.splitlines())))
                functions += [(f"{rel}:{node.name}", node.end_lineno - node.lineno + 1)
                              for node in ast.walk(ast.parse(source))
                              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return modules, functions


def test_sizes_hold():
    modules, functions = sizes()
    assert len(modules) > 40 and any(p.endswith("bdm_train/train.py") for p, _ in modules)  # the scan sees them
    assert [(p, n) for p, n in modules if n > MAX_MODULE_LINES] == []
    assert [(p, n) for p, n in functions if n > MAX_FUNCTION_LINES] == []


def test_sizes_bite(tmp_path):
    """The counter counts: a 61-line function and a 401-line module are over the limits."""
    (tmp_path / "pkg").mkdir()
    body = "def long():\n" + "    x = 1\n" * 60 + "\n" * (400 - 61) + "y = 2\n"
    (tmp_path / "pkg" / "m.py").write_text(body)
    modules, functions = sizes(str(tmp_path), ("pkg",))
    rel = os.path.join("pkg", "m.py")
    assert modules == [(rel, 401)] and functions == [(rel + ":long", 61)]
