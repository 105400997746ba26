"""Where an export is written before it is complete, and how it never stays behind.

An export goes into a hidden staging folder next to --out, `.{out name}.export-tmp-{pid}-{host}`, and is renamed
into place when every file is written, so --out is either complete or absent. The folder of a 7B export holds
about 14 GB, so it must not outlive its process:
  * an error or Ctrl-C removes it on the way out (a `finally`);
  * SIGTERM (a scheduler's stop, `kill`) is turned into `ExportStopped`, which unwinds through that `finally`
    (export/cli.py installs the handler through common/signals.py, as training does);
  * SIGKILL, a crash or a lost machine leaves it: the next export into the same parent folder removes every staging
    folder whose process (named by pid and host in the folder name) no longer runs (`sweep_stale_staging`).
A folder of another host is only reported: this machine cannot tell whether that process still runs.

Space: the export is refused before writing when the disk cannot hold it (`check_space`), and a write the disk
stops anyway (quota, a disk filling meanwhile) is reported with the path and the space needed (`storage_error`).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

from minigpt4.common.output_dir import free_bytes, human_bytes, is_space_problem, storage_reason
from minigpt4.export.source import ExportError

log = logging.getLogger(__name__)

STAGING_MARK = ".export-tmp-"
_STAGING_NAME = re.compile(r"\.(?P<out>.+)\.export-tmp-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._-]+)")


class ExportStopped(BaseException):
    """SIGTERM arrived during an export. A BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` swallows it on its way to the export's cleanup."""


def this_host() -> str:
    """The host name as it may appear in a folder name (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown-host"


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{this_host()}"


def process_running(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]  # the field after "(command name)"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists
    return state not in ("Z", "X")


def sweep_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in `parent` that exports of this host left when they were killed (their process
    no longer runs); name those of other hosts in a warning. Returns the folders removed."""
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing to sweep (writing there fails with its own error)
        return removed
    for entry in entries:
        match = _STAGING_NAME.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid, host = int(match["pid"]), match["host"]
        if host != this_host():
            log.warning("%s is the staging folder of an export on host %s (pid %d); remove it once that export "
                        "has stopped", entry, host, pid)
            continue
        if pid == os.getpid() or process_running(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            log.warning("cannot remove %s, the staging folder of a stopped export (pid %d); remove it by hand",
                        entry, pid)
            continue
        log.warning("removed %s, the staging folder of an export that was stopped (pid %d no longer runs)", entry, pid)
        removed.append(entry)
    return removed


def check_space(out: Path, needed: int) -> None:
    """Refuse before writing when the export cannot fit next to `out`: a half-written export helps nobody."""
    free = free_bytes(out.parent)
    if free is not None and free < needed:
        raise ExportError(f"cannot write the export {out}: not enough space on its disk; it needs about "
                          f"{human_bytes(needed)} ({human_bytes(free)} free in {out.parent}); free some space or "
                          "choose another --out")


def storage_error(err: BaseException, out: Path, staging: Path, needed: int) -> ExportError | None:
    """A one-line ExportError when the disk stopped a write (full, quota, read-only), else None (then the failure
    is not the user's to fix and keeps its traceback)."""
    reason = storage_reason(err, staging, needed)
    if reason is None:
        return None
    where = getattr(err, "filename", None) or staging
    free = free_bytes(out.parent)
    room = f"{human_bytes(free)} free in {out.parent}" if free is not None else "free space unknown"
    fix = "free some space or choose another --out" if is_space_problem(reason) else f"make {out.parent} writable"
    return ExportError(f"cannot write the export {out} ({where}): {reason}; it needs about {human_bytes(needed)} "
                       f"({room}). Nothing was left behind; {fix}, then export again")
