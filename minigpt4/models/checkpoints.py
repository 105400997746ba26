"""Every weight that enters the model goes through here, strictly.

The reference code loaded with `strict=False`, so a wrong path or a renamed key silently left random weights.
Here every load compares keys and shapes first and fails with a message naming the file, the keys and what
was expected; keys we knowingly do not use are listed explicitly, anything else unknown is an error.

Here: reading and writing state files (safetensors, weights-only .pth), strict key/shape checks, and this
project's own checkpoint format (trainable tensors only: `trainable_tensors`, `save_trainable`,
`load_trainable` / `load_trainable_tensors`), which the runner's checkpoints use too. The readers of other
projects' released files (LAVIS, Hugging Face BLIP-2, MiniGPT-4 and LLaVA projectors) are in
released_weights.py.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minigpt4.common.errors import CheckpointError  # defined low, raised here; importable from here
from minigpt4.common.files import NotRegularFileError, require_regular_file

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
# The name prefix of the modules FSDP wraps in place (torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE).
FSDP_PREFIX = "_fsdp_wrapped_module."


# --------------------------------------------------------------------------------------------- reading files


def key_listing(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def check_finite(
    state: Mapping[str, torch.Tensor], source: PathLike, *, as_dtypes: Mapping[str, torch.dtype] | None = None
) -> None:
    """NaN/inf in a checkpoint means a diverged run or a corrupt file; refuse it instead of training on it.

    `as_dtypes` ({key: dtype the model keeps that tensor in}) checks the values after the cast as well: a
    float64 1e300 is finite in the file and inf in float32, and inf weights give NaN logits, whose greedy
    answers are empty strings (which POPE scores as "yes").
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor {key!r} contains NaN or inf values")
        target = (as_dtypes or {}).get(key, tensor.dtype)
        narrower = target.is_floating_point and torch.finfo(target).max < torch.finfo(tensor.dtype).max
        if narrower and not torch.isfinite(tensor.to(target)).all():
            raise CheckpointError(
                f"{source}: tensor {key!r} ({tensor.dtype}) has values up to {tensor.abs().max().item():.3g}, "
                f"beyond the range of {target} (largest {torch.finfo(target).max:.3g}) that the model keeps "
                "it in: they would become inf. The file is damaged or from a diverged run"
            )


def load_state_file(path: PathLike, *, check_values: bool = True) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} dict from .safetensors or a plain-tensor .pth/.pt/.bin (on the CPU).

    Pickles are read with `weights_only=True`: a file whose pickle would construct arbitrary objects or call
    functions is refused, never executed. {"model": ...} / {"state_dict": ...} wrappers are unwrapped.
    """
    try:  # a FIFO or a link to /dev/zero would block the reader forever
        path = require_regular_file(path, "checkpoint file")
    except NotRegularFileError as err:
        raise CheckpointError(str(err)) from None
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is long and suggests weights_only=False; keep only the line naming the culprit.
            detail = next((line for line in str(exc).splitlines() if "GLOBAL" in line.upper()), str(exc)[:300])
            raise CheckpointError(
                f"{path} is not a plain tensor checkpoint: its pickle asks to build objects or call functions "
                f"that tensor-only loading refuses (nothing was executed). {detail.strip()} "
                "If you trust the file, re-save just its state dict (or convert it to .safetensors)."
            ) from exc
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors, .pth, .pt or .bin")

    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: expected a flat dict of tensors, but these entries are not tensors: {key_listing(not_tensors)}"
        )
    if check_values:
        check_finite(obj, path)
    return obj


def save_state_file(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write safetensors atomically: a temporary file in the same folder, then os.replace.

    A crash mid-write leaves the previous file intact instead of a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (views of one parameter, tied weights).
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(plain, str(tmp), metadata={"format": "pt", **(metadata or {})})
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------- strict loading


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, what: str, source: PathLike
) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches (if any)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"cannot load {what} from {source}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {key_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {key_listing(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es): {key_listing(mismatched, limit=6)}")
    raise CheckpointError("\n".join(lines))


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, source: PathLike, assign: bool = False
) -> None:
    """Check keys and shapes ourselves (readable error), then load_state_dict(strict=True).

    assign=True hands the checkpoint tensors to the module instead of copying (keeping their dtype): use it
    for a module built on the meta device, which skips the random init and halves peak memory.
    """
    expected = module.state_dict()
    check_state_dict(expected, state_dict, what=what, source=source)
    if not assign:  # copying casts to the module's dtypes; assigned tensors keep their own (checked on reading)
        check_finite(state_dict, source, as_dtypes={k: v.dtype for k, v in expected.items()})
    module.load_state_dict(state_dict, strict=True, assign=assign)


# ------------------------------------------------------------------------------ this project's checkpoints
#
# The trainable-checkpoint format, with one owner: a safetensors file of the model's trainable tensors (the
# projector) under their model.state_dict() names. The runner's checkpoints and final/, the evaluation's and
# demo's model.ckpt and the exporter all list, write, read and check it with the four functions below.


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with requires_grad=True, under their model.state_dict() names, detached (sharing storage
    with the parameters, so copying into them loads the model).

    Also for a model FSDP wrapped in place: its parameter names then run through the wrapper modules, whose
    prefix is dropped, and its own state_dict() would be a collective gathering the whole frozen LLM. The
    trainable parameters are whole on every rank there (NO_SHARD units, runners/placement.py)."""
    return {name.replace(FSDP_PREFIX, ""): p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save trainable tensors (keys as in model.state_dict()) to safetensors, atomically and flushed to disk."""
    if not tensors:
        raise ValueError("save_trainable: no tensors to save")
    save_state_file(path, tensors, metadata)


def load_trainable(model: nn.Module, path: PathLike) -> list[str]:
    """Load a save_trainable file into `model` (load_trainable_tensors); returns the loaded keys."""
    state = load_state_file(path)
    load_trainable_tensors(model, state, path)
    return list(state)


_VIB_ONLY = re.compile(r"(^|\.)(llama_proj_std\.|mu_p$|std_p$)")


def _projector_type_hint(missing: list[str], unexpected: list[str]) -> list[str]:
    """The usual cause of a trainable-file mismatch, said plainly: a linear file for a VIB model or back."""
    if missing and all(_VIB_ONLY.search(k) for k in missing) and not unexpected:
        return ["the file holds a linear projector (no VIB std head llama_proj_std / prior mu_p, std_p): "
                "load it with model.mm_projector_type: linear"]
    if unexpected and all(_VIB_ONLY.search(k) for k in unexpected) and not missing:
        return ["the file holds a VIB projector (std head and prior): load it with model.mm_projector_type: vib"]
    return []


def load_trainable_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """Copy `tensors` (read from `source`) into the model's trainable tensors, strictly.

    The names must be exactly the model's trainable ones with the same shapes: a file from another projector
    type or LLM size, or one holding frozen weights, fails here, naming every difference in one line, instead
    of half-loading. Values must stay finite in the dtypes the model keeps them in.
    """
    own = trainable_tensors(model)
    every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    names = {name.replace(FSDP_PREFIX, "") for name, _ in every}
    missing = [k for k in own if k not in tensors]
    absent = [k for k in tensors if k not in names]
    frozen = [k for k in tensors if k in names and k not in own]
    mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or absent or frozen or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} trainable parameter(s) not in the file: {key_listing(missing)}")
        if absent:
            problems.append(f"{len(absent)} key(s) the model does not have: {key_listing(absent)}")
        if frozen:
            problems.append(f"{len(frozen)} key(s) the model keeps frozen (a trainable file holds only what "
                            f"trains): {key_listing(frozen)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {key_listing(mismatched, limit=6)}")
        problems += _projector_type_hint(missing, absent)
        raise CheckpointError(f"cannot load trainable weights from {source}: {'; '.join(problems)}")
    check_finite(tensors, source, as_dtypes={k: own[k].dtype for k in tensors})
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor)  # casts to the parameter's device and dtype
