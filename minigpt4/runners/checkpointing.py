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

`state.pt` contains only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
FINAL_DIR = "final"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the previous checkpoint (if any) is untouched and still `latest`."""


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- what a model's trainable state is -------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own `trainable_state_dict()` if it has one, else every parameter with requires_grad=True.

    Names are those of `model.state_dict()` (pass the bare model, not its DDP wrapper).
    """
    if hasattr(model, "trainable_state_dict"):
        tensors = dict(model.trainable_state_dict())
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no trainable tensors (no parameter has requires_grad=True)")
    return tensors


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the model's trainable tensors; names and shapes must match exactly, both ways."""
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not match the model's trainable tensors:"]
        if missing:
            lines.append(f"  missing from the checkpoint: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  not trainable in the model: {', '.join(unexpected)}")
        if wrong_shape:
            lines.append("  shape mismatch: " + "; ".join(wrong_shape))
        raise ValueError("\n".join(lines))
    targets = model.state_dict(keep_vars=True)
    not_in_state_dict = sorted(set(expected) - set(targets))
    if not_in_state_dict:
        raise ValueError(
            f"{type(model).__name__}.trainable_state_dict() names tensors that are not in its state_dict(): "
            f"{', '.join(not_in_state_dict)}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))


# ---- low-level writers (tests replace these to simulate a full disk) ------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
    """Delete half-written checkpoint directories left by a crash (never a complete `step_*` directory)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif p.name.startswith(".old-"):
            # A checkpoint being replaced by a new copy of the same step. If the crash came between the two
            # renames, the new copy never arrived: put the old one back.
            original = root / p.name.split("-", 2)[2]
            if original.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, original)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep_last` (<= 0: keep all).

    Raises CheckpointWriteError if anything fails; the previous checkpoint and `latest` are then untouched.
    """
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    name = checkpoint_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        _write_safetensors(trainable, tmp / TRAINABLE_FILE, {"step": str(step), "format": "pt"})
        _write_torch(state, tmp / STATE_FILE)
        _fsync_dir(tmp)
        if final.exists():
            # Same step written again (e.g. after resuming from an older `latest`): swap, then drop the old copy.
            old = root / f".old-{os.getpid()}-{name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else None
        raise CheckpointWriteError(
            f"writing checkpoint {final} failed ({type(err).__name__}: {err}); "
            f"the previous checkpoint ({previous if previous else 'none'}) is untouched"
        ) from err

    if keep_last > 0:
        keep = {p for _, p in _step_dirs(root)[-keep_last:]} | {final}
        for _, p in _step_dirs(root):
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
    return final


def save_final(output_dir: str | os.PathLike, trainable: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `final/trainable.safetensors` and `final/config.json` (replacing an older `final/` atomically)."""
    out = Path(output_dir)
    final = out / FINAL_DIR
    tmp = out / f".tmp-{FINAL_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_safetensors(trainable, tmp / TRAINABLE_FILE, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if final.exists():
            old = out / f".old-{FINAL_DIR}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---- finding and loading ------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory `checkpoints/latest` names, or None when there is no `latest` file."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not _STEP_DIR.match(name) or not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, its `checkpoints/` folder, or a run's output_dir; return the checkpoint dir."""
    p = Path(path)
    if (p / TRAINABLE_FILE).is_file() or (p / STATE_FILE).is_file():
        return p
    if (p / LATEST).is_file():
        found = latest_checkpoint(p.parent)
    elif (p / CHECKPOINTS / LATEST).is_file():
        found = latest_checkpoint(p)
    else:
        found = None
    if found is None:
        raise FileNotFoundError(
            f"{p} is neither a checkpoint directory (with {TRAINABLE_FILE} and {STATE_FILE}) nor a run output_dir "
            f"with {CHECKPOINTS}/{LATEST}"
        )
    return found


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (trainable tensors on CPU, state dict) from a checkpoint directory."""
    ckpt = resolve_checkpoint(path)
    for name in (TRAINABLE_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} lacks {name}; it is incomplete or not a checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(ckpt / TRAINABLE_FILE), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError(f"{ckpt / STATE_FILE} is not a training state written by this runner")
    return tensors, state
