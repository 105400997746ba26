"""Atomic training checkpoints that hold only what training changes.

Layout under `output_dir`:

    checkpoints/step_00000400/trainable.safetensors   the trainable tensors only (the projector), by state_dict name
    checkpoints/step_00000400/state.pt                optimizer, scaler, step/epoch/data position, counters, the
                                                      RNG states of *every* rank (gathered to rank 0: one file)
    checkpoints/latest                                text file naming the newest complete checkpoint directory
    final/trainable.safetensors (+ config.json)       written once when training completes

Only rank 0 writes. A checkpoint is first written into `checkpoints/.tmp-step_…`, flushed to disk, and then
renamed into place; `latest` is replaced (write temp file, os.replace) only after that. A crash or a failed
write at any moment therefore leaves `latest` pointing at a complete checkpoint. On resume every rank reads the
same files (a shared filesystem is assumed for multi-node runs) and takes its own entry of the RNG states.

A checkpoint damaged afterwards (a truncated copy, a deleted folder, a `latest` naming nothing, NaN or inf in a
trainable tensor or in the optimizer's state) is passed over on resume for the newest older one that `keep_last`
kept and that reads completely (`newest_complete_checkpoint`, which says which one it passed over and why); only
when none reads completely is the resume refused. A write that fails for lack of space or permission raises
CheckpointWriteError, naming the path, the space it needs and the space free; under torchrun rank 0 shares that
failure, so every rank raises it at once (`written_by_rank0`).

`state.pt` contains only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
`trainable.safetensors` is this project's trainable-checkpoint format, owned by models/checkpoints.py: listed
by `trainable_tensors`, written by `save_trainable`, read by `load_state_file` and checked against the model by
`load_trainable_tensors`, exactly as model.ckpt is for evaluation and the demo.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from minigpt4.common import dist
from minigpt4.common.errors import CheckpointError
from minigpt4.common.output_dir import free_bytes, human_bytes, is_space_problem, storage_reason
from minigpt4.models.checkpoints import check_finite, load_state_file, save_trainable

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
FINAL_DIR = "final"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_HEADER_ALLOWANCE = 64 << 10  # zip/pickle/JSON headers on top of the tensors' bytes (a few KiB in practice)


class CheckpointWriteError(CheckpointError):
    """The disk (space, quota, permissions) stopped a checkpoint write; the message names the path and the space
    needed. The previous checkpoint (if any) is untouched and still `latest`."""


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- low-level writers (tests replace these, and save_trainable, to simulate a full disk) --------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")  # the .tmp- prefix: swept by remove_stale_temporaries
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---- saving -------------------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Delete half-written checkpoint and `final/` directories left by a crash (never a complete one)."""
    out = Path(output_dir)
    root = out / CHECKPOINTS
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".tmp-"):
                _remove(p)
            elif p.name.startswith(".old-"):
                # A checkpoint being replaced by a new copy of the same step. If the crash came between the two
                # renames, the new copy never arrived: put the old one back.
                _restore_or_remove(p, root / p.name.split("-", 2)[2])
    if out.is_dir():
        for p in sorted(out.iterdir()):
            if p.name.startswith(f".tmp-{FINAL_DIR}-"):
                _remove(p)
            elif p.name.startswith(f".old-{FINAL_DIR}-"):
                _restore_or_remove(p, out / FINAL_DIR)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename the finished `tmp` directory to `final`; an existing `final` is first renamed to `old` and deleted
    afterwards (a crash between the renames leaves `old`, which remove_stale_temporaries puts back)."""
    if final.exists():
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _restore_or_remove(old: Path, original: Path) -> None:
    if original.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, original)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list/tuple: what a checkpoint of it needs on disk, headers aside."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _check_space(folder: Path, needed: int) -> None:
    """Refuse before writing when the files cannot fit: a half-written checkpoint helps nobody."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def _storage_error(err: Exception, target: Path, needed: int, untouched: str,
                   space_hint: str = "") -> CheckpointWriteError | None:
    """A one-line CheckpointWriteError if the disk stopped the write (full, quota, read-only), else None."""
    reason = storage_reason(err, target.parent, needed)
    if reason is None:
        return None
    free = free_bytes(target.parent)
    fix = f"free some space{space_hint}" if is_space_problem(reason) else f"make {target.parent} writable"
    return CheckpointWriteError(
        f"cannot write {target}: {reason}; it needs about {human_bytes(needed)} "
        f"({human_bytes(free) + ' free' if free is not None else 'free space unknown'} there). {untouched}; "
        f"{fix}, then continue with train.py --resume"
    )


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep_last` (<= 0: keep all).

    Raises CheckpointWriteError when the disk stops the write (full, quota, read-only); any other failure keeps
    its own exception and traceback. Either way the previous checkpoint and `latest` are untouched.
    """
    root = Path(output_dir) / CHECKPOINTS
    name = checkpoint_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    needed = tensor_bytes(trainable) + tensor_bytes(state) + _HEADER_ALLOWANCE
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
        _check_space(root, needed)
        tmp.mkdir()
        save_trainable(tmp / TRAINABLE_FILE, trainable, {"step": str(step)})
        _write_torch(state, tmp / STATE_FILE)
        _fsync_dir(tmp)
        # Same step written again (e.g. after resuming from an older `latest`): swap, then drop the old copy.
        _move_into_place(tmp, final, root / f".old-{os.getpid()}-{name}")
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / LATEST
        previous = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
        untouched = f"The previous checkpoint ({previous or 'none'}) is untouched"
        storage = _storage_error(err, final, needed, untouched, " (a new checkpoint is written before the oldest "
                                 "is deleted: run.keep_last + 1 of them must fit)")
        if storage is None:
            raise
        raise storage from err

    if keep_last > 0:
        keep = {p for _, p in _step_dirs(root)[-keep_last:]} | {final}
        for _, p in _step_dirs(root):
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
    return final


def written_by_rank0(write: Callable[[], T], what: str) -> T | None:
    """Run `write` on rank 0 alone and tell every rank whether it failed; collective (every rank calls it).

    Without this, a failed write ended rank 0 (exit 2) while the others went on into the next step's collective
    and waited there until torchrun stopped them (NCCL: until its timeout), printing nothing of why. Now every
    rank raises at once: rank 0 its own exception (traceback kept), the others a CheckpointWriteError with the
    same one-line message, or a RuntimeError naming rank 0's failure when it was not the disk's. Returns what
    `write` returned on rank 0, None elsewhere."""
    result, failure = None, None
    if dist.is_main():
        try:
            result = write()
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised unchanged
            failure = err
    shared = None if failure is None else (isinstance(failure, CheckpointWriteError), type(failure).__name__,
                                           str(failure).strip().split("\n")[0])
    shared = dist.broadcast_object(shared)
    if failure is not None:
        raise failure
    if shared is not None:
        disk, kind, message = shared
        if disk:
            raise CheckpointWriteError(message)
        raise RuntimeError(f"rank 0 failed while writing {what}: {kind}: {message}")
    return result


def save_final(output_dir: str | os.PathLike, trainable: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `final/trainable.safetensors` and `final/config.json` (replacing an older `final/` atomically).

    Raises CheckpointWriteError when the disk stops the write, like save_checkpoint."""
    out = Path(output_dir)
    final = out / FINAL_DIR
    tmp = out / f".tmp-{FINAL_DIR}-{os.getpid()}"
    needed = tensor_bytes(trainable) + _HEADER_ALLOWANCE
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _check_space(out, needed)
        save_trainable(tmp / TRAINABLE_FILE, trainable)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        _move_into_place(tmp, final, out / f".old-{FINAL_DIR}-{os.getpid()}")
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        storage = _storage_error(err, final, needed, "The last checkpoint is complete")
        if storage is None:
            raise
        raise storage from err
    return final


# ---- finding and loading ------------------------------------------------------------------------------------------


def holds_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a run's checkpoints (a `latest` file, valid or not, or any step directory)."""
    root = Path(output_dir) / CHECKPOINTS
    return (root / LATEST).exists() or bool(_step_dirs(root))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory `checkpoints/latest` names, or None when there is no `latest` file."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    path = root / name
    if not _STEP_DIR.match(name) or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, its `checkpoints/` folder, or a run's output_dir; return the checkpoint dir."""
    p = Path(path)
    if (p / TRAINABLE_FILE).exists() or (p / STATE_FILE).exists():
        return p
    if (p / LATEST).is_file():
        found = latest_checkpoint(p.parent)
    elif (p / CHECKPOINTS / LATEST).is_file():
        found = latest_checkpoint(p)
    else:
        found = None
    if found is None:
        raise CheckpointError(
            f"{p} is neither a checkpoint directory (with {TRAINABLE_FILE} and {STATE_FILE}) nor a run output_dir "
            f"with {CHECKPOINTS}/{LATEST}"
        )
    return found


def _short(err: BaseException) -> str:
    """`Type: first sentence` of an error (torch appends a paragraph about miniz to a damaged zip's message)."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The trainable file, read as every one is (models/checkpoints.load_state_file); load_checkpoint checks the
    values for NaN/inf, and loading them into the model checks them again in the dtypes it keeps them in
    (load_trainable_tensors)."""
    try:
        return load_state_file(path, check_values=False)
    except CheckpointError as err:  # the runner wrote it whole: unreadable now means damaged since
        raise CheckpointError(f"{path} is truncated or damaged ({_short(err.__cause__ or err)})") from err


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file: OSError 22, RuntimeError (zip), EOFError, UnpicklingError
        raise CheckpointError(f"{path} is truncated or damaged ({_short(err)})") from err
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{path} is not a training state written by this runner")
    return state


def _tensor_leaves(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    """{dotted path: tensor} of every tensor in a nested dict/list/tuple (an optimizer state dict)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in _tensor_leaves(value, f"{prefix}.{key}").items()}


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (trainable tensors on CPU, state dict) from a checkpoint directory; CheckpointError names the file
    that is missing, truncated or damaged, or the tensor that holds NaN or inf. A non-finite trainable tensor
    or optimizer moment is damage too, whether the bits changed since or a diverged step was saved: resuming
    would train on it, and the first optimizer step would carry it into every trainable weight."""
    ckpt = resolve_checkpoint(path)
    for name in (TRAINABLE_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt} lacks {name}; it is incomplete or not a checkpoint")
    tensors, state = _read_trainable(ckpt / TRAINABLE_FILE), _read_state(ckpt / STATE_FILE)
    check_finite(tensors, ckpt / TRAINABLE_FILE)
    check_finite(_tensor_leaves(state.get("optimizer", {}), "optimizer"), ckpt / STATE_FILE)
    return tensors, state


@dataclass
class ResumePoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    passed_over: list[str] = field(default_factory=list)  # newer checkpoints that could not be used, and why


def _resume_candidates(root: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, newest first: the one `latest` names, then the older ones keep_last kept. A newer
    step directory than `latest` is never tried: it is from a branch that was abandoned by a resume."""
    pointer = root / LATEST
    steps = _step_dirs(root)
    if not pointer.is_file():
        return [p for _, p in reversed(steps)], ([f"{root} has no {LATEST} file"] if steps else [])
    name = pointer.read_text(errors="replace").strip()
    match = _STEP_DIR.match(name)
    if match and (root / name).is_dir():
        return [root / name] + [p for step, p in reversed(steps) if step < int(match.group(1))], []
    return [p for _, p in reversed(steps)], [f"{pointer} names {name!r}, which is not a checkpoint directory"]


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> ResumePoint | None:
    """The newest checkpoint of a run that reads completely: the one `latest` names, else the newest older one
    that keep_last kept (ResumePoint.passed_over says which were passed over and why). None when the folder
    holds no checkpoint at all; CheckpointError, naming every checkpoint tried and why, when none is complete."""
    root = Path(output_dir) / CHECKPOINTS
    candidates, passed_over = _resume_candidates(root)
    if not candidates and not passed_over:
        return None
    for path in candidates:
        try:
            return ResumePoint(path, *load_checkpoint(path), passed_over=passed_over)
        except CheckpointError as err:
            passed_over.append(str(err))
    raise CheckpointError(
        f"no complete checkpoint to resume from in {root}: {'; '.join(passed_over)}. Start afresh in another "
        f"run.output_dir, or delete {root} to start afresh in this one"
    )
