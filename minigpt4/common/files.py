"""Small file helpers shared by the loaders, the scorers, the feature cache and provenance.

`require_regular_file` is the one check every reader of a file a user named goes through before opening it:
a FIFO blocks `open()` forever, a link to /dev/zero or /dev/urandom never reaches end-of-file, and a
directory or a socket fails deep inside a library with a message that does not say what the path is.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

_BLOCK = 1 << 20

_KINDS = (  # (test, description) for what a non-regular path is
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFileError(ValueError):
    """A path that should name a regular file is missing or is something else (FIFO, device, directory, ...).

    `path` is the path as given, `what` the role of the file ("image", "checkpoint file", ...), `reason` the
    message without them ("file not found", "not a regular file: a FIFO (named pipe)"), for callers that wrap
    it in their own error type (BadImageError, CheckpointError, ...).
    """

    def __init__(self, path: str | os.PathLike, what: str, reason: str, message: str):
        self.path, self.what, self.reason = str(path), what, reason
        super().__init__(message)


def _describe(mode: int) -> str:
    return next((text for test, text in _KINDS if test(mode)), f"not a regular file (mode {stat.filemode(mode)})")


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` (symbolic links followed) if it is a regular file, else NotRegularFileError saying what it is.

    Only metadata is read (os.stat), so this never blocks, whatever the path is.
    """
    path = Path(path)
    link = f"a symbolic link to {os.path.realpath(path)}" if path.is_symlink() else ""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        detail = f" ({link}, which does not exist)" if link else ""
        raise NotRegularFileError(path, what, f"file not found{detail}", f"{what} not found: {path}{detail}") from None
    except OSError as err:  # a symlink loop, a path through a file, no permission on a folder
        raise NotRegularFileError(path, what, f"cannot be examined ({err.strerror})",
                                  f"{what} cannot be examined: {path} ({err.strerror})") from None
    if stat.S_ISREG(mode):
        return path
    found = f"{link}, which is {_describe(mode)}" if link else _describe(mode)
    raise NotRegularFileError(path, what, f"not a regular file: {found}",
                              f"{what} is not a regular file: {path} is {found}")


def require_regular_files_in(folder: str | os.PathLike, what: str) -> None:
    """Every entry of `folder` that is not itself a folder must be a regular file (a weights or tokenizer
    folder: transformers opens whichever files it needs, and one FIFO among them would block it forever).
    Dangling links are left alone: a file the loader needs is reported missing by the loader."""
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_dir() or (entry.is_symlink() and not entry.exists()):
            continue
        require_regular_file(entry, what)


def sha256_file(path: str | os.PathLike, what: str = "file to hash") -> str:
    """SHA-256 of a regular file's bytes, read in 1 MiB blocks (weights files are many GB)."""
    digest = hashlib.sha256()
    with open(require_regular_file(path, what), "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()

