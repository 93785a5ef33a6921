"""Results as ``OUT.json`` and ``OUT.md``, each written atomically (a cut-off run leaves the old pair)."""
import json
import os

from bdm_runtime.io import atomic_path


def write_results(res, out, text=None):
    """``out.json`` (``res``) and, if ``text`` is given, ``out.md`` (``text``)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    if text is not None:
        with atomic_path(out + ".md") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
