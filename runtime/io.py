"""Output files: atomic writes, a command's outputs published together or not at all, and the checks
made before any work, so that a mistake costs no compute and writes nothing.

Temporary names are hidden and carry a random token (``.NAME.XXXXXXXX.tmp.EXT``, made with
``O_EXCL``, so two writers never share one); ``NAME`` is shortened where needed so that a temporary
name fits whenever the final name does (``NAME_MAX``). A writer removes its own temporaries when it
fails or is interrupted (Ctrl-C, SIGTERM: see ``bdm_runtime.errors.run_cli``), and nothing else:
a name cannot prove which process, container or host made it, so no writer ever deletes another
one's files. A ``.*.tmp`` left by a process killed outright (SIGKILL, power loss) is never read;
delete it by hand once no bdm command is writing to that folder (docs/runtime.md, "Reliability").
"""
import contextlib
import errno
import os
import shutil
import signal
import tempfile

from .errors import BdmError

_TOKEN = 8          # the random characters mkstemp/mkdtemp add (from [a-z0-9_])
_MAX_EXT = 16       # longest extension kept on a temporary name (Pillow and numpy look at it)
_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def name_max(folder):
    """The longest file name (in bytes) the file system of ``folder`` (or its nearest existing ancestor) takes."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, ValueError, OSError):
        return 255


def _affixes(folder, base, suffix):
    """``(prefix, suffix)`` of a temporary name for ``base`` in ``folder``: ``.BASE.`` + token + ``suffix``,
    with ``BASE`` cut (to whole UTF-8 characters) so the whole name fits ``NAME_MAX``; the token keeps it unique."""
    room = name_max(folder) - len(os.fsencode(suffix)) - _TOKEN - 2
    raw = os.fsencode(base)
    short = base if len(raw) <= room else raw[:max(room, 1)].decode("utf-8", "ignore")  # whole characters only
    return f".{short}.", suffix


def _temp_suffix(base):
    ext = os.path.splitext(base)[1]
    return ".tmp" + (ext if len(os.fsencode(ext)) <= _MAX_EXT else "")


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
    prefix, suffix = _affixes(folder, base, _temp_suffix(base))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
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
        hint = " (is the disk full?)" if e.errno in _SPACE else ""
        raise BdmError(f"cannot write {target}: {e.strerror or e}{hint}") from None


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
    validates its arguments first creates nothing when they are wrong. Before renaming anything
    the commit checks that every staged file is still there (``folder(target, expect=names)``
    names a folder's files): if another process removed one, nothing is published and the
    command fails instead of reporting outputs it does not have.
    """

    def __init__(self):
        self._files = []    # (tmp, target)
        self._folders = []  # (tmp, where the tmp folder goes or None to merge, inner folder, target, expected names)

    def file(self, target):
        """A temporary file beside ``target`` (same extension) that becomes ``target``."""
        target = os.fspath(target)
        tmp = temp_file(target)
        self._files.append((tmp, target))
        return tmp

    def folder(self, target, expect=()):
        """A temporary folder whose contents end up in folder ``target`` (created if missing); ``expect``:
        the names of the files the caller will write there (re-iterable, with ``len``; checked at the commit)."""
        target = os.path.abspath(os.fspath(target))
        top = target
        while not os.path.isdir(os.path.dirname(top)):  # the first missing folder on the way
            top = os.path.dirname(top)
        if os.path.isdir(target):
            prefix, suffix = _affixes(target, "staged", ".tmp")
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target)
            self._folders.append((tmp, None, tmp, target, expect))
            inner = tmp
        else:
            parent = os.path.dirname(top)
            prefix, suffix = _affixes(parent, os.path.basename(top), ".tmp")
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
            inner = os.path.join(tmp, os.path.relpath(target, top))
            self._folders.append((tmp, top, inner, target, expect))
            os.makedirs(inner, exist_ok=True)
        _mode(tmp, 0o777)
        return inner

    def _check_complete(self):
        """``BdmError`` if a staged file vanished (another process removed it): then nothing is published."""
        gone = [target for tmp, target in self._files if not os.path.isfile(tmp)]
        for _, _, inner, target, expect in self._folders:
            lost = [name for name in expect if not os.path.isfile(os.path.join(inner, name))]
            if lost:
                gone.append(f"{target} ({len(lost)} of {len(expect)} files, e.g. {lost[0]})")
        if gone:
            raise BdmError(f"staged outputs vanished before publishing: {', '.join(gone)}; another process removed "
                           "them (a cleaner of hidden .*.tmp files?): nothing was published, run the command again")

    def commit(self):
        """Rename every output into place (signals held meanwhile), after checking every one is complete."""
        self._check_complete()
        for tmp, _ in self._files:
            _fsync(tmp)
        with _signals_deferred():
            for tmp, target in self._files:
                os.replace(tmp, target)
            for tmp, top, _, _, _ in self._folders:
                if top is None:
                    _merge(tmp, os.path.dirname(tmp))
                    continue
                try:
                    os.rename(tmp, top)
                except OSError:  # another process created it meanwhile: join it
                    _merge(tmp, top)
        self._files, self._folders = [], []

    def discard(self):
        """Remove every temporary output (this command's own: nothing else is ever removed)."""
        for tmp, _ in self._files:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        for folder in self._folders:
            shutil.rmtree(folder[0], ignore_errors=True)
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


def check_name(flag, path):
    """``BdmError`` (naming ``flag``) if a component of ``path`` is longer than its file system takes
    (``NAME_MAX`` bytes), or the whole path longer than ``PATH_MAX``: refused before any work."""
    full = os.path.abspath(path)
    limit = name_max(os.path.dirname(full))
    for part in full.split(os.sep):
        size = len(os.fsencode(part))
        if size > limit:
            raise BdmError(f"{flag} {path}: the name {part[:40]}... is {size} bytes, this file system takes at most "
                           f"{limit}: choose a shorter name")
    try:
        path_max = int(os.pathconf(os.path.dirname(full) if os.path.isdir(os.path.dirname(full)) else "/",
                                   "PC_PATH_MAX"))
    except (AttributeError, ValueError, OSError):
        path_max = 4096
    if len(os.fsencode(full)) >= path_max:
        raise BdmError(f"{flag} {path}: the path is {len(os.fsencode(full))} bytes, at most {path_max - 1} here: "
                       "choose a shorter one")


def image_name(index):
    """The file name of image ``index`` in an ``--out-dir`` folder."""
    return f"{index:06d}.png"


class ImageNames:
    """The file names of images ``indices`` (a ``range``) in an ``--out-dir`` folder, made as they are read."""

    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return map(image_name, self.indices)

    def __len__(self):
        return len(self.indices)


def _same(a, b):
    """Whether paths ``a`` and ``b`` name the same file (symlinks and ``..`` resolved)."""
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_collisions(out, out_dir, npz, images=range(0)):
    """Refuse outputs that would overwrite one another: ``--out``/``--npz`` the same file, or one of the
    images ``images`` (indices) that ``--out-dir`` receives, or the ``--out-dir`` folder itself."""
    named = [(flag, p) for flag, p in (("--out", out), ("--npz", npz)) if p]
    if len(named) == 2 and _same(out, npz):
        raise BdmError(f"--out {out} and --npz {npz} are the same file: give two names")
    if not out_dir:
        return
    for flag, p in named:
        if _same(p, out_dir):
            raise BdmError(f"{flag} {p} is the --out-dir folder {out_dir}: give another name")
        if not _same(os.path.dirname(os.path.abspath(p)), out_dir):
            continue
        name = os.path.basename(p)
        stem = os.path.splitext(name)[0]
        if name.lower().endswith(".png") and stem.isdigit() and len(stem) >= 6 and int(stem) in images:
            raise BdmError(f"{flag} {p} is also image {int(stem)} of --out-dir {out_dir}: the image would replace "
                           "it; write it elsewhere or name it otherwise (e.g. grid.png)")


def check_outputs(out, out_dir, npz, images=range(0)):
    """Refuse unwritable, too long or colliding destinations before sampling (so a mistake costs no compute
    and writes nothing).

    ``out`` a grid ``*.png``, ``out_dir`` a folder for one PNG per image (of indices ``images``),
    ``npz`` a ``*.npz`` (each may be ``None``, not all); the checks of ``bdm-run`` and ``bdm-sample``.
    """
    if not (out or out_dir or npz):
        raise BdmError("nothing to write: give --out GRID.png, --out-dir DIR and/or --npz FILE.npz")
    for flag, path in (("--out", out), ("--npz", npz), ("--out-dir", out_dir)):
        if path:
            check_name(flag, path)
    if out_dir and len(images):
        check_name("--out-dir", os.path.join(out_dir, image_name(images[-1])))
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
    check_collisions(out, out_dir, npz, images)
