"""torch.distributed helpers for runs launched by torchrun (or by plain `python`).

torchrun tells every process who it is through RANK, WORLD_SIZE and LOCAL_RANK. Those are the only source of
truth here: CUDA_VISIBLE_DEVICES only says which GPUs a process may see, not how many processes there are (the
released reference code read the device count from it, which breaks as soon as a launcher restricts it).

Without those variables (plain `python train.py ...`) the run is a single process and no process group is
created; every helper below then degrades to the obvious single-process behaviour, so callers never branch.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
from typing import Any

import torch
import torch.distributed as dist


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


DEVICES = ("cuda", "cpu", "auto")


def device_problem(device: str, key: str = "run.device") -> str | None:
    """Why `device`, the value of the config key `key`, cannot run on this machine (not one of DEVICES, or cuda
    where torch sees no GPU); None when it can. train.py / evaluate.py ask before anything is built."""
    if device not in DEVICES:
        return f"{key} = {device!r}; expected one of {', '.join(DEVICES)}"
    if device == "cuda" and not torch.cuda.is_available():
        return f"{key} = 'cuda' but torch sees no GPU on this machine; use cpu (or auto: a GPU where there is one)"
    return None


def resolve_device(device: str, key: str = "run.device") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. 'cuda' without a GPU is an error, not a fallback."""
    problem = device_problem(device, key)
    if problem is not None:
        raise (ValueError if device not in DEVICES else RuntimeError)(problem)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> tuple[int, int, int, torch.device]:
    """Join the process group torchrun set up; returns (rank, world_size, local_rank, device).

    NCCL on CUDA, gloo on CPU. Each CUDA process uses GPU `local_rank` of the GPUs it can see. Calling it again
    after the group exists just reports the current values.
    """
    kind = resolve_device(device)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world_size is None:
        # Plain `python`: one process, no process group.
        rank, world_size, local_rank = 0, 1, 0
    else:
        local_rank = rank if local_rank is None else local_rank
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")

    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "launch at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=run_device if kind == "cuda" else None,
        )
    return rank, world_size, local_rank, run_device


def init_command_processes(device: str) -> tuple[int, int, torch.device]:
    """`init_distributed` for a command (train, evaluate): (rank, world_size, device), with INFO logging kept on
    rank 0 alone, as every rank makes the same progress and one report of it is enough."""
    rank, world_size, _, run_device = init_distributed(device)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return rank, world_size, run_device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on the process that writes files (rank 0), and in a single-process run."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single-process run)."""
    if not is_dist():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself in a single-process run."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single-process run); returns the tensor for chaining."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank `src`'s copy."""
    if is_dist():
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


def cleanup() -> None:
    """Leave the process group (safe to call when none exists).

    Drop every DDP/FSDP wrapper (e.g. `del runner`) *before* calling this. If a wrapper's reducer outlives
    the group's registry entry, it holds the last reference to the gloo group and destroys it while holding
    the GIL; gloo's worker thread may then need the GIL to free a finished collective's tensors, and the
    process hangs at exit (pytorch/pytorch#56297). Destroyed here, the group is released without the GIL.
    """
    gc.collect()  # wrappers the caller already dropped but that sit in reference cycles
    if is_dist():
        dist.destroy_process_group()
