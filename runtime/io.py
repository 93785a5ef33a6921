"""Output files: atomic writes, a command's outputs published together or not at all, and the checks
made before any work, so that a mistake costs no compute and writes nothing.

Temporary names are hidden, carry the writer's process id (``.NAME.PID.XXXXXXXX.tmp.EXT``) and
are removed when the writer fails or is interrupted (Ctrl-C, SIGTERM: see
``bdm_runtime.errors.run_cli``). Those of a process that was killed outright (SIGKILL, power loss)
are ignored by every reader and removed by the next writer to the same folder
(:func:`remove_stale`).
"""
import contextlib
import os
import re
import shutil
import signal
import tempfile

from .errors import BdmError

# .NAME.PID.XXXXXXXX.tmp[.EXT]: mkstemp/mkdtemp fill XXXXXXXX from [a-z0-9_].
_TEMP = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


def _prefix(base):
    return f".{base}.{os.getpid()}."


def _mode(path, mode):
    """Give a new temporary file or folder the mode ``open()``/``mkdir()`` would have (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _fsync(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_file(target):
    """A new empty hidden temporary file beside ``target`` (keeping its extension: Pillow and numpy look at it)."""
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(base), suffix=".tmp" + os.path.splitext(base)[1], dir=folder)
    os.close(fd)
    _mode(tmp, 0o666)
    return tmp


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (``os.replace``)."""
    path = os.fspath(path)
    tmp = temp_file(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def writing(target):
    """An ``OSError`` while writing ``target`` (through temporary files) becomes one line naming ``target``."""
    try:
        yield
    except OSError as e:
        raise BdmError(f"cannot write {target}: {e.strerror or e} (is the disk full?)") from None


def _alive(pid):
    """Whether process ``pid`` exists (POSIX; elsewhere assume it does, and so never remove its files)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def is_temp(name):
    """Whether ``name`` is one of our temporary files or folders."""
    return _TEMP.match(name) is not None


def remove_stale(folder):
    """Remove the temporary files and folders in ``folder`` left by processes that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


@contextlib.contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM while outputs are renamed into place (delivered right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # not POSIX, or not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _merge(src, dst):
    """Move the contents of folder ``src`` into folder ``dst`` (replacing files of the same name), then drop ``src``."""
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and os.path.isdir(d):
            _merge(s, d)
        else:
            os.replace(s, d)
    os.rmdir(src)


class Staging:
    """The outputs of one command: written under temporary names, then published together or not at all.

    ``file(target)`` and ``folder(target)`` say where to write each output. Leaving the ``with``
    block normally renames every one into place (a folder's files join ``target``; missing
    folders on the way appear in one rename); an exception (an error, Ctrl-C, SIGTERM) removes
    them all. Nothing is created until the first ``file``/``folder`` call, so a command that
    validates its arguments first creates nothing when they are wrong.
    """

    def __init__(self):
        self._files = []    # (tmp, target)
        self._folders = []  # (tmp, where the tmp folder goes, or None to merge into the target)

    def file(self, target):
        """A temporary file beside ``target`` (same extension) that becomes ``target``."""
        target = os.fspath(target)
        remove_stale(os.path.dirname(os.path.abspath(target)))
        tmp = temp_file(target)
        self._files.append((tmp, target))
        return tmp

    def folder(self, target):
        """A temporary folder whose contents end up in folder ``target`` (created if missing)."""
        target = os.path.abspath(os.fspath(target))
        top = target
        while not os.path.isdir(os.path.dirname(top)):  # the first missing folder on the way
            top = os.path.dirname(top)
        if os.path.isdir(target):
            remove_stale(target)
            tmp = tempfile.mkdtemp(prefix=_prefix("staged"), suffix=".tmp", dir=target)
            self._folders.append((tmp, None))
            inner = tmp
        else:
            parent = os.path.dirname(top)
            remove_stale(parent)
            tmp = tempfile.mkdtemp(prefix=_prefix(os.path.basename(top)), suffix=".tmp", dir=parent)
            self._folders.append((tmp, top))
            inner = os.path.join(tmp, os.path.relpath(target, top))
            os.makedirs(inner, exist_ok=True)
        _mode(tmp, 0o777)
        return inner

    def commit(self):
        """Rename every output into place (signals held meanwhile)."""
        for tmp, _ in self._files:
            _fsync(tmp)
        with _signals_deferred():
            for tmp, target in self._files:
                os.replace(tmp, target)
            for tmp, top in self._folders:
                if top is None:
                    _merge(tmp, os.path.dirname(tmp))
                    continue
                try:
                    os.rename(tmp, top)
                except OSError:  # another process created it meanwhile: join it
                    _merge(tmp, top)
        self._files, self._folders = [], []

    def discard(self):
        """Remove every temporary output (signals held meanwhile: a second Ctrl-C or SIGTERM cannot leave
        half of them)."""
        with _signals_deferred():
            for tmp, _ in self._files:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            for tmp, _ in self._folders:
                shutil.rmtree(tmp, ignore_errors=True)
            self._files, self._folders = [], []

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


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
    nearest existing ancestor is one); creates nothing."""
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
