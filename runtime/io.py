"""Atomic file output: write to a temporary file beside the target, then rename.

An interrupted run leaves either the old file or the new one, never half of one.
"""
import contextlib
import os
import tempfile


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
    from .errors import BdmError

    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BdmError(f"{what} {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise BdmError(f"cannot create {what} {folder}: {e.strerror or e}")
    if not os.access(folder, os.W_OK):
        raise BdmError(f"{what} {folder} is not writable")
    return folder
