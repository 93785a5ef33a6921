"""One ``bdm-train`` per run folder: an exclusive lock on ``OUT/.bdm-train.lock`` for the whole run.

Two runs into one ``--out`` would replace each other's ``model.pt`` and interleave ``log.jsonl``
(issue 22), so a run holds ``fcntl.flock`` on a lock file inside its folder from before it reads a
checkpoint to after it writes its last one; a second run (``--resume`` too) is refused in one line
naming the holder (its pid and host, which the holder writes into the file).

The lock file is created without replacing anything (``O_CREAT``, no truncation before the lock
is held) and removed by its holder on every way out (an error, Ctrl-C, SIGTERM); a run killed
outright (SIGKILL, power loss) leaves it behind, and the kernel has released its lock, so the next
run takes it over. The holder unlinks the file while still holding it; a run that locked the
file just before it was unlinked sees that the path no longer names the file it holds, and
starts over (else two runs could hold locks on two different files of the same name).

A folder the run had to create is removed again when the run fails before writing anything into
it (``os.rmdir`` removes only empty folders, so nothing of the user's can go).
"""
import contextlib
import os
import socket

from bdm_runtime.errors import BdmError

LOCK_NAME = ".bdm-train.lock"


def _holder(path):
    """What the lock file says about its holder (``"pid 123 on host x"``), or ``None``."""
    try:
        with open(path) as f:
            text = f.read(200).strip()
    except OSError:
        return None
    return text or None


class RunLock:
    """``with RunLock(out) as lock: ... lock.acquire() ...``: held from :meth:`acquire` to the block's end.

    ``acquire(create=True)`` creates a missing ``out`` (and remembers what it created, see the
    module docstring). Outside a POSIX system (no ``fcntl``) the lock is a no-op.
    """

    def __init__(self, out):
        self.out = os.path.abspath(os.fspath(out))
        self.path = os.path.join(self.out, LOCK_NAME)
        self.fd = None
        self.created = []   # folders this run created, innermost last

    def acquire(self, create=False):
        """Take the lock (once); ``BdmError`` naming the holder when another process has it."""
        if self.fd is not None:
            return self
        if create:
            self._make_folders()
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise BdmError(f"cannot create the run lock {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                who = _holder(self.path) or "another process"
                raise BdmError(f"run folder {self.out} is in use by another bdm-train ({who}; lock {self.path}): "
                               "wait for it to finish, or train into another --out") from None
            except OSError as e:   # a file system without locks
                os.close(fd)
                raise BdmError(f"cannot lock {self.path}: {e.strerror or e} (a file system without locks?): "
                               "train into a folder on a local disk") from None
            if self._still_named(fd):
                break
            os.close(fd)   # unlinked by its previous holder meanwhile: lock the new file
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        return self

    def _still_named(self, fd):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _make_folders(self):
        missing, folder = [], self.out
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise BdmError(f"--out {self.out}: {folder} exists and is not a folder") from None
                continue   # another process made it meanwhile: not ours to remove
            except OSError as e:
                raise BdmError(f"cannot create --out {folder}: {e.strerror or e}") from None
            self.created.append(folder)

    def release(self, failed=False):
        """Unlink the lock file (while holding it) and unlock; after a failure, remove the empty folders
        this run created."""
        if self.fd is not None:
            if self._still_named(self.fd):
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        if failed:
            for folder in reversed(self.created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)   # only if empty: what another process put there stays
        self.created = []

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.release(failed=kind is not None)


def rollback_log(out, step):
    """Cut ``OUT/log.jsonl`` back to checkpoint ``step`` before a resumed run goes on (atomically).

    A run stopped between a log line and its next checkpoint has logged steps it will train again;
    the resumed run logs them anew, so its log equals an uninterrupted run's. Kept: every line up to
    the last one of a step at most ``step`` (steps rise through a log); dropped: the lines after it,
    a half-written last line included. Nothing is written when nothing is dropped.
    """
    from bdm_runtime.io import atomic_path

    path = os.path.join(out, "log.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BdmError(f"cannot read {path}: {e.strerror or e}") from None
    keep = 0
    for i, line in enumerate(lines):
        if line.endswith(b"\n") and _step(line) is not None and _step(line) <= step:
            keep = i + 1
    if keep == len(lines):
        return
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.writelines(lines[:keep])
    except OSError as e:
        raise BdmError(f"cannot write {path}: {e.strerror or e} (is the disk full?)") from None


def _step(line):
    """The ``step`` of one log line, or ``None`` for a line that is not one of ours."""
    import json

    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
