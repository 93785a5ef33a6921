"""The maths the code cites is in the repository: every B label used has its section in docs/maths.md,
and nothing points at files outside the repository."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (".py", ".md", ".cfg", ".toml", ".txt")
LABEL = re.compile(r"\bB(\d{1,2})\b")


def _files():
    for top in ("bdm_train", "export", "runtime", "benchmarks", "examples", "tests", "docs", "models"):
        for here, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            yield from (os.path.join(here, f) for f in files if f.endswith(TEXT))
    yield from (os.path.join(ROOT, f) for f in ("README.md", "Makefile", "setup.cfg"))


def _sections():
    with open(os.path.join(ROOT, "docs", "maths.md"), encoding="utf-8") as f:
        return set(re.findall(r"^## B(\d+)\.", f.read(), flags=re.M))


def test_every_cited_label_has_its_section():
    sections = _sections()
    assert sections == {str(i) for i in range(1, 17)}, sections
    cited = {}
    for path in _files():
        if path.endswith(os.path.join("docs", "maths.md")):
            continue
        with open(path, encoding="utf-8") as f:
            for label in LABEL.findall(f.read()):
                cited.setdefault(label, os.path.relpath(path, ROOT))
    assert cited, "no B label found: the scan is broken"
    assert not set(cited) - sections, {k: v for k, v in cited.items() if k not in sections}


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"shared/reference|bdm-math\.md|\.\./shared|/work/")
    hits = []
    for path in _files():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if outside.search(line) and not path.endswith("test_docs.py"):
                    hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert hits == []
