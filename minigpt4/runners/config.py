"""`RunConfig`: the `run:` section of a training YAML, a typed schema merged by omegaconf (common/config.py) like
the model and eval sections, with one `validate()`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from minigpt4.common.config import ConfigError
from minigpt4.runners.schedules import SCHEDULE_NAMES

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
_POSITIVE_INTS = ("batch_size", "grad_accum_steps", "max_epoch", "log_every", "max_nonfinite_steps")
_POSITIVE_INTS_OR_NULL = ("iters_per_epoch", "max_steps", "save_every_steps")
_CHOICES = {"lr_sched": SCHEDULE_NAMES, "amp": ("bf16", "fp16", "none"), "distributed": ("ddp", "fsdp"),
            "device": ("cuda", "cpu", "auto")}


def _float_rule(key: str) -> str:
    low, low_allowed, high, optional = _FLOAT_RANGES[key]
    rule = f"a finite number {'>=' if low_allowed else '>'} {low:g}"
    rule += f" and <= {high:g}" if high is not None else ""
    return rule + (" or null" if optional else "")


def _in_range(key: str, value: Any) -> bool:
    low, low_allowed, high, optional = _FLOAT_RANGES[key]
    if value is None:
        return optional
    return (math.isfinite(value) and (value >= low if low_allowed else value > low)
            and (high is None or value <= high))


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
    iters_per_epoch: Optional[int] = None
    max_steps: Optional[int] = None  # stop early after this many optimizer steps; the lr schedule still spans the run
    shuffle: bool = True
    num_workers: int = 4
    pin_memory: bool = True

    # optimizer and lr schedule (see minigpt4/runners/schedules.py for the formulas)
    lr_sched: str = "linear_warmup_cosine"
    init_lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = None
    # "bf16" | "fp16" (CUDA only, with a GradScaler) | "none"; null: what model.precision trains under
    #   (common/config.py TRAINING_AMP), bf16 for precision auto
    amp: Optional[str] = None
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
    wandb_run_name: Optional[str] = None

    # checkpoints
    save_every_steps: Optional[int] = None
    save_every_epoch: bool = True
    keep_last: int = 2  # <= 0 keeps every checkpoint
    resume: bool = False  # continue from output_dir/checkpoints/latest (fresh start, with a warning, if none)
    resume_ckpt_path: Optional[str] = None  # or from this checkpoint directory

    def __post_init__(self) -> None:
        # built by omegaconf (OmegaConf.to_object) or directly (tests, tools): valid either way once it exists
        self.amp = "bf16" if self.amp is None else self.amp
        self.betas = tuple(self.betas)  # YAML gives a list
        self.validate()

    @classmethod
    def bad_value(cls, key: str, value: Any) -> str | None:
        """The message for a bad run.<key> (`key` is dotted: run.init_lr), in this section's wording; None for
        keys without one. Used here and by the config merge, for a value of the wrong type (True for a lr)."""
        name = key.rpartition(".")[2]
        if name in _FLOAT_RANGES:
            return f"{key} must be {_float_rule(name)}, got {value!r}"
        if name in _POSITIVE_INTS:
            return f"{key} must be a positive integer, got {value!r}"
        if name in _POSITIVE_INTS_OR_NULL:
            return f"{key} must be a positive integer or null, got {value!r}"
        if name == "betas":
            return f"{key} must be two numbers in [0, 1), got {value!r}"
        if name in _CHOICES:
            return f"{key} must be one of {', '.join(map(repr, _CHOICES[name]))}, got {value!r}"
        return None

    def validate(self) -> None:
        """Ranges and choices the types cannot express; ConfigError naming the key. NaN passes every `x <= 0`
        test, and an lr of 0 or below trains nothing or climbs the loss, each with exit 0: every float setting
        is checked for a finite value in its range."""
        bad = [key for key in _FLOAT_RANGES if not _in_range(key, getattr(self, key))]
        bad += [key for key in _POSITIVE_INTS if getattr(self, key) < 1]
        bad += [key for key in _POSITIVE_INTS_OR_NULL if getattr(self, key) is not None and getattr(self, key) < 1]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            bad.append("betas")
        bad += [key for key, valid in _CHOICES.items() if getattr(self, key) not in valid]
        if bad:
            raise ConfigError(self.bad_value(f"run.{bad[0]}", getattr(self, bad[0])))
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise ConfigError("run.num_workers and run.warmup_steps must be >= 0")

    def check_dataset_size(self, dataset_size: int | None, world_size: int) -> None:
        """An epoch has optimizer steps to take: a map-style dataset of `dataset_size` samples (None: a streamed one)
        fills one micro-batch of run.batch_size on each of `world_size` ranks, and without run.iters_per_epoch
        run.grad_accum_steps of them. train.py asks before the model is built or the output folder made."""
        if dataset_size is None:
            if self.iters_per_epoch is None:
                raise ConfigError("run.iters_per_epoch must be set when the training dataset is streamed (webdataset "
                                  "shards): an epoch is that many optimizer steps")
            return
        per_pass = dataset_size // (self.batch_size * world_size)  # micro-batches per rank, tail dropped
        needed = 1 if self.iters_per_epoch is not None else self.grad_accum_steps
        if per_pass < needed:
            accum = "" if needed == 1 else f" × run.grad_accum_steps ({self.grad_accum_steps})"
            raise ConfigError(
                f"run.batch_size = {self.batch_size}: the training dataset has {dataset_size} samples, fewer than "
                f"run.batch_size{accum} × {world_size} rank(s) = {self.batch_size * needed * world_size}, so an "
                f"epoch would hold no optimizer step; lower run.batch_size"
                + (" or run.grad_accum_steps" if needed > 1 else "") + " or add data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
