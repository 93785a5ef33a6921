"""The maths the code cites is in the repository: every B label used has its section in docs/maths.md,
and nothing points at files outside the repository."""
import os
import re
import shutil
import subprocess

import pytest

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


# --- The README is the front door; docs/ holds the rest, and every relative link between them resolves. ---

README_MAX_LINES = 260  # issue 22: the README stays a front door (about 250 lines), not a lab notebook
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _lines(text, blank_code=True):
    """The lines of a Markdown text with fenced code blocks blanked, and inline code spans too unless asked
    not to (a link shown as code is not a link; a heading's code span is part of its anchor)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        elif fenced:
            lines.append("")
        else:
            lines.append(re.sub(r"`[^`]*`", "``", line) if blank_code else line)
    return lines


def _anchors(text):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, anchors = {}, set()
    for line in _lines(text, blank_code=False):
        m = HEADING.match(line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(2).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _broken_links(path, text, root=ROOT):
    """Every relative link or image of a Markdown file that does not resolve: a missing file or a path out of
    the repository (neither is on GitHub), or an anchor with no such heading in the file it names."""
    broken = []
    here = os.path.dirname(path)
    for n, line in enumerate(_lines(text), 1):
        for target in LINK.findall(line):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # http:, https:, mailto: are not files of the repository
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(here, file)) if file else path
            where = f"{os.path.relpath(path, root)}:{n}: {target}"
            if os.path.relpath(dest, root).startswith(os.pardir):
                broken.append(f"{where} (outside the repository)")
            elif file and not os.path.exists(dest):
                broken.append(f"{where} (no such file)")
            elif anchor and anchor not in _anchors(_read(dest) if file else text):
                broken.append(f"{where} (no heading with this anchor)")
    return broken


def _markdown_files():
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def test_every_relative_link_and_image_resolves():
    broken, links = [], 0
    for path in _markdown_files():
        text = _read(path)
        links += sum(len(LINK.findall(line)) for line in _lines(text))
        broken += _broken_links(path, text)
    assert links >= 20, f"only {links} links found: the scan is broken"
    assert broken == []


def test_link_check_catches_what_it_should(tmp_path):
    """The checker, against a hand-made tree: each kind of broken link is reported, good ones are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "docs" / "a.md").write_text("# A title\n\n## Few-step sampling: `solvers` & grids\n\n## A title\n")
    page = str(tmp_path / "docs" / "b.md")
    good = ("[a](a.md) ![i](../img.png) [h](a.md#a-title) [h2](a.md#a-title-1) [c](a.md#few-step-sampling-solvers--grids) "
            "[self](#b) [web](https://example.org/x.md) [t](a.md \"title\")\n# B\n")
    assert _broken_links(page, good, root=str(tmp_path)) == []
    bad = ("[gone](missing.md)\n![gone](../nope.png)\n[anchor](a.md#no-such-heading)\n[self](#nowhere)\n"
           "[up](../../outside.md)\n[x](a.md#a-title-2)\n")
    reasons = [b.rsplit(" (", 1)[1] for b in _broken_links(page, bad, root=str(tmp_path))]
    assert reasons == ["no such file)", "no such file)", "no heading with this anchor)", "no heading with this anchor)",
                       "outside the repository)", "no heading with this anchor)"]
    # A link shown as code, or inside a fenced block, is not a link.
    assert _broken_links(page, "`[x](missing.md)`\n```\n[x](missing.md)\n```\n", root=str(tmp_path)) == []


def test_readme_is_a_front_door():
    lines = _read(os.path.join(ROOT, "README.md")).splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    # The three commands a newcomer looks for are in it, and every file of docs/ is linked from it.
    text = "\n".join(lines)
    for command in ("make demo", "make test", "bdm-train ", "bdm-export ", "bdm-run "):
        assert command in text, command
    docs = {os.path.relpath(p, ROOT).replace(os.sep, "/") for p in _markdown_files()[1:]}
    assert {d for d in docs if d not in text} == set(), "name (link) these docs/ files in the README"


def test_no_link_points_at_a_generated_file():
    """A link to a file git ignores (demo_out/, runs/, a build) resolves here after `make demo` but not in a
    fresh clone or on GitHub."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: git's ignore rules cannot be asked")
    targets = set()
    for path in _markdown_files():
        for line in _lines(_read(path)):
            for target in LINK.findall(line):
                file = target.partition("#")[0]
                if file and not SCHEME.match(target):
                    targets.add(os.path.relpath(os.path.normpath(os.path.join(os.path.dirname(path), file)), ROOT))
    assert targets
    r = subprocess.run(["git", "check-ignore", "--no-index", *sorted(targets)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr  # 0: some are ignored, 1: none is
    assert r.stdout.split() == []
    control = subprocess.run(["git", "check-ignore", "--no-index", "demo_out/grid.png"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert control.stdout.split() == ["demo_out/grid.png"]  # the question can be answered yes
