"""Output files: atomic writes (a temporary file beside the target, then a rename) and the checks
made before any work, so that a mistake costs no compute and writes nothing.

An interrupted run leaves either the old file or the new one, never half of one.
"""
import contextlib
import os
import tempfile

from .errors import BdmError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # Keep the extension last so that writers that look at it (Pillow, numpy) still work.
    fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp" + os.path.splitext(base)[1], dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def writable_folder(folder, what):
    """Create ``folder`` if missing and check it is a writable folder; ``BdmError`` naming ``what`` if not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BdmError(f"{what} {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise BdmError(f"cannot create {what} {folder}: {e.strerror or e}")
    if not os.access(folder, os.W_OK):
        raise BdmError(f"{what} {folder} is not writable")
    return folder


def check_writable_dir(flag, path):
    """``BdmError`` (naming ``flag``) unless ``path`` is a writable folder or can be created (its
    nearest existing ancestor is one)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise BdmError(f"{flag} {path}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BdmError(f"{flag} {path}: folder {probe} is not writable")


def check_outputs(out, out_dir, npz):
    """Refuse unwritable destinations before sampling (so a mistake costs no compute and writes nothing).

    ``out`` a grid ``*.png``, ``out_dir`` a folder for one PNG per image, ``npz`` a ``*.npz`` (each
    may be ``None``, not all); the checks of ``bdm-run`` and ``bdm-sample``.
    """
    if not (out or out_dir or npz):
        raise BdmError("nothing to write: give --out GRID.png, --out-dir DIR and/or --npz FILE.npz")
    for flag, path in (("--out", out), ("--npz", npz)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise BdmError(f"{flag} {path} is a directory")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BdmError(f"{flag} {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise BdmError(f"{flag} {path}: folder {folder} is not writable")
    if out and not out.lower().endswith(".png"):
        raise BdmError(f"--out {out}: the grid is a PNG, name it *.png")
    if npz and not npz.lower().endswith(".npz"):
        raise BdmError(f"--npz {npz}: name it *.npz")
    if out_dir:
        check_writable_dir("--out-dir", out_dir)
