"""`RunConfig`: the `run:` section of a training YAML, as a validated dataclass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from minigpt4.runners.schedules import SCHEDULE_NAMES


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):  # float(True) == 1.0: a typo, not a learning rate
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# run.<key>: (lowest value, whether the lowest value itself is allowed, highest value or None, may be null)
_FLOAT_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "init_lr": (0.0, False, None, False),
    "min_lr": (0.0, True, None, False),
    "warmup_lr": (0.0, True, None, False),
    "weight_decay": (0.0, True, None, False),
    "adam_eps": (0.0, False, None, False),
    "warmup_ratio": (0.0, True, 1.0, True),
    "max_grad_norm": (0.0, False, None, True),
}


def _check_float(key: str, value: Any) -> float | None:
    """run.<key> as a float in its range (see _FLOAT_RANGES); ValueError naming the key otherwise."""
    low, low_allowed, high, optional = _FLOAT_RANGES[key]
    if value is None and optional:
        return None
    number = _as_float(value)
    if (number is not None and math.isfinite(number) and (number >= low if low_allowed else number > low)
            and (high is None or number <= high)):
        return number
    rule = f"a finite number {'>=' if low_allowed else '>'} {low:g}"
    rule += f" and <= {high:g}" if high is not None else ""
    raise ValueError(f"run.{key} must be {rule}{' or null' if optional else ''}, got {value!r}")


@dataclass
class RunConfig:
    output_dir: str = "output/run"
    seed: int = 42
    device: str = "auto"  # "cuda" | "cpu" | "auto"

    # batches and length; an epoch is iters_per_epoch optimizer steps (None: what one pass over a map-style
    # dataset gives, len(dataset) // (batch_size × world_size) // grad_accum_steps)
    batch_size: int = 2  # per GPU
    grad_accum_steps: int = 1
    max_epoch: int = 1
    iters_per_epoch: int | None = None
    max_steps: int | None = None  # stop early after this many optimizer steps; the lr schedule still spans the run
    shuffle: bool = True
    num_workers: int = 4
    pin_memory: bool = True

    # optimizer and lr schedule (see minigpt4/runners/schedules.py for the formulas)
    lr_sched: str = "linear_warmup_cosine"
    init_lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    amp: str = "bf16"  # "bf16" | "fp16" (CUDA only, with a GradScaler) | "none"
    max_nonfinite_steps: int = 5  # abort after this many optimizer steps in a row with a non-finite loss
    find_unused_parameters: bool = False
    # several processes: "ddp" replicates the model and all-reduces the trainable gradients; "fsdp" shards the
    # frozen LLM and encoder over the ranks (the small trainable projector stays replicated), so each GPU holds
    # a 1/world_size share of the frozen weights; checkpoints are the same either way (runners/placement.py)
    distributed: str = "ddp"

    # logging
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "minigpt4-adavib"
    wandb_run_name: str | None = None

    # checkpoints
    save_every_steps: int | None = None
    save_every_epoch: bool = True
    keep_last: int = 2  # <= 0 keeps every checkpoint
    resume: bool = False  # continue from output_dir/checkpoints/latest (fresh start, with a warning, if none)
    resume_ckpt_path: str | None = None  # or from this checkpoint directory

    def __post_init__(self) -> None:
        # PyYAML reads "1e-4" (no dot) as a string; it is accepted rather than fail deep inside the optimizer.
        # NaN passes every `x <= 0` test, and an lr of 0 or below trains nothing or climbs the loss, each with
        # exit 0: every float setting is checked for a finite value in its range.
        for key in _FLOAT_RANGES:
            setattr(self, key, _check_float(key, getattr(self, key)))
        betas = tuple(_as_float(b) for b in self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(b is not None and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"run.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas  # YAML gives a list
        positive = ("batch_size", "grad_accum_steps", "max_epoch", "log_every", "max_nonfinite_steps")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("iters_per_epoch", "max_steps", "save_every_steps"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"run.{key} must be a positive integer or null, got {value!r}")
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise ValueError("run.num_workers and run.warmup_steps must be >= 0")
        if self.lr_sched not in SCHEDULE_NAMES:
            raise ValueError(f"run.lr_sched must be one of {', '.join(SCHEDULE_NAMES)}, got {self.lr_sched!r}")
        if self.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"run.amp must be 'bf16', 'fp16' or 'none', got {self.amp!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"run.distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.device not in ("cuda", "cpu", "auto"):
            raise ValueError(f"run.device must be 'cuda', 'cpu' or 'auto', got {self.device!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a mapping (e.g. the YAML `run:` section); unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run.* key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
