"""An output folder belongs to one run at a time, and a full or read-only disk is reported as such.

    lock = claim_output_dir(run.output_dir, "run.output_dir")   # every rank calls it; rank 0 takes the lock
    ...                                                          # the run writes into the folder
    lock.release()

The lock is `fcntl.flock` on `<output_dir>/.lock`, a file holding the holder's pid and host. Two runs started into
one folder would otherwise race: each sweeps the other's half-written temporaries and both append to the same
logs. Why flock rather than O_CREAT|O_EXCL: the kernel drops a flock when its holder dies (SIGKILL included), so a
lock file left behind by a dead pid is stale by construction and the next run simply takes it over; an O_EXCL file
would need a pid-liveness check, which means nothing for a pid on another node of a multi-node run. Only rank 0
locks (it is the rank that writes); the other ranks learn from it whether the run may go on.

Storage errors: torch and safetensors report a full disk in their own words ("unexpected pos 704 vs 598",
"os error 28"), so `storage_reason` recognises them by errno, by the OS's own text, or by the free space left.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from minigpt4.common import dist
from minigpt4.common.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Errors that say the disk, its quota or its permissions stopped a write: the user can fix these.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputDirError(ConfigError):
    """The output folder cannot be used: another run holds it, or it cannot be created or written."""


# ------------------------------------------------------------------------------------------------ storage


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def storage_reason(err: BaseException, path: str | os.PathLike, needed: int | None = None) -> str | None:
    """Why a write under `path` failed if the disk is to blame ("No space left on device", "Read-only file
    system", ...), else None (then the failure is not the user's to fix and keeps its traceback)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        for code in STORAGE_ERRNOS:
            if os.strerror(code) in text:  # safetensors: "... (os error 28)", torch: "strerror: ..."
                return os.strerror(code)
    free = free_bytes(path)
    if needed is not None and free is not None and free < needed:  # torch's zip writer says "unexpected pos"
        return os.strerror(errno.ENOSPC)
    return None


def is_space_problem(reason: str) -> bool:
    return reason in {os.strerror(code) for code in SPACE_ERRNOS}


# --------------------------------------------------------------------------------------------------- lock


_HELD: dict[str, "OutputLock"] = {}  # this process's locks, by lock-file path (released at exit)


class OutputLock:
    """An acquired lock (or, on ranks other than 0, a stand-in whose release does nothing)."""

    def __init__(self, path: Path | None = None, fd: int | None = None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlink while still holding it: a run that opened this inode meanwhile sees it is gone (_acquire)
            if self.path is not None and _same_file(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        _HELD.pop(str(self.path), None)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """What the lock file says about its holder ("pid 123 on host"), "" if nothing yet."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _cannot_write(out: Path, key: str, err: OSError, needed: int) -> OutputDirError:
    """The refusal for a lock file that could not be made or written: a full disk says how much it needed."""
    if err.errno in SPACE_ERRNOS:
        free = free_bytes(out)
        room = f" ({human_bytes(free)} free there)" if free is not None else ""
        return OutputDirError(f"cannot write the lock file {out / LOCK_FILE} ({key}): {err.strerror}; it needs "
                              f"about {human_bytes(needed)}{room}; free space there or choose another {key}")
    return OutputDirError(f"cannot write in the output folder {out} ({key}): {err.strerror}; make it "
                          f"writable or choose another {key}")


def _acquire(out: Path, key: str) -> OutputLock:
    path = out / LOCK_FILE
    holder = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise _cannot_write(out, key, err, len(holder)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "a process that is just starting"
            os.close(fd)
            raise OutputDirError(f"the output folder {out} is in use by another run ({holder}; lock file {path}); "
                                 f"wait for it to finish or choose another {key}") from None
        except OSError as err:  # a filesystem without flock (some NFS / Lustre mounts)
            log.warning("cannot lock %s (%s): two runs started into %s at once would not be stopped",
                        path, err.strerror, out)
            os.close(fd)
            return OutputLock()
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released and removed the file between our open and our flock: retry
    stale = _holder(fd)
    if stale:
        log.info("%s was left by a run that has ended (%s); taking it over", path, stale)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
    except OSError as err:  # a disk that had room for the file's name but not for its line
        OutputLock(path, fd).release()
        raise _cannot_write(out, key, err, len(holder)) from None
    lock = OutputLock(path, fd)
    _HELD[str(path)] = lock
    return lock


def claim_output_dir(output_dir: str | os.PathLike, key: str) -> OutputLock:
    """Take `<output_dir>/.lock` on rank 0 (creating the folder). Raises OutputDirError on every rank, naming the
    folder and the pid that holds it, if another run holds it or the folder cannot be written."""
    lock, refusal = OutputLock(), None
    if dist.is_main():
        try:
            lock = _acquire(Path(output_dir), key)
        except OutputDirError as err:
            refusal = str(err)
    refusal = dist.all_gather_object(refusal)[0]  # rank 0's answer is every rank's answer
    if refusal is not None:
        raise OutputDirError(refusal)
    return lock


@atexit.register
def _release_all() -> None:  # a clean exit leaves no lock file (a killed run leaves a stale one: harmless)
    for lock in list(_HELD.values()):
        lock.release()
