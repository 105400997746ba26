"""Learning-rate schedules as pure functions of the global optimizer step.

Every schedule maps `step` (0-based count of optimizer steps already taken, i.e. the lr used *for* step
`step + 1`) to a learning rate; none keeps state, so resuming from a checkpoint needs only the step number.
T is `total_steps` (max_epoch × iters_per_epoch) and W the number of warmup steps.

MiniGPT-4/LAVIS applies its warmup per iteration during the first epoch but its cosine *per epoch* (the lr is
constant within an epoch and only moves between epochs). Here everything is defined per optimizer step, which
is smoother and independent of how steps are grouped into epochs; with many epochs the two agree closely, with
few (stage 2 uses 5) the per-step curve is the better-behaved one.
"""
from __future__ import annotations

import math
from typing import Callable


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


def linear_warmup_cosine(
    step: int, *, total_steps: int, warmup_steps: int, warmup_lr: float, init_lr: float, min_lr: float
) -> float:
    """MiniGPT-4's schedule: linear warmup, then cosine annealing.

        step <  W:  lr = warmup_lr + (init_lr − warmup_lr) · step / W
        step >= W:  lr = min_lr + (init_lr − min_lr) · ½ · (1 + cos(π · t)),  t = min(1, (step − W) / (T − W))

    So lr(0) = warmup_lr, lr(W) = init_lr, lr(W + (T − W)/2) = (init_lr + min_lr)/2 and lr(T) = min_lr
    (the last step actually taken, T − 1, is a hair above min_lr).
    """
    _check(total_steps, warmup_steps)
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_from_ratio(total_steps: int, warmup_ratio: float) -> int:
    """W = ceil(warmup_ratio · T), the convention of Hugging Face's Trainer (which the AdaVIB recipe follows)."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def warmup_linear_decay(
    step: int, *, total_steps: int, warmup_ratio: float, init_lr: float, min_lr: float, warmup_lr: float = 0.0
) -> float:
    """AdaVIB's schedule: linear warmup over a fraction of the run, then linear decay to min_lr.

    With W = ceil(warmup_ratio · T):

        step <  W:  lr = warmup_lr + (init_lr − warmup_lr) · step / W
        step >= W:  lr = min_lr + (init_lr − min_lr) · max(0, T − step) / (T − W)

    So lr(0) = warmup_lr (0 by default: the first step is a no-op, as in Hugging Face's linear schedule),
    lr(W) = init_lr, lr((W + T)/2) = (init_lr + min_lr)/2 and lr(T) = min_lr.
    """
    warmup_steps = warmup_steps_from_ratio(total_steps, warmup_ratio)
    _check(total_steps, warmup_steps)
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return min_lr
    return min_lr + (init_lr - min_lr) * max(0, total_steps - step) / decay_steps


def constant(step: int, *, init_lr: float, warmup_steps: int = 0, warmup_lr: float = 0.0) -> float:
    """lr = init_lr, after an optional linear warmup: step < W: warmup_lr + (init_lr − warmup_lr) · step / W."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    return init_lr


SCHEDULE_NAMES = ("linear_warmup_cosine", "warmup_linear_decay", "constant")


def make_lr_schedule(
    name: str,
    *,
    total_steps: int,
    init_lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    warmup_ratio: float | None,
) -> Callable[[int], float]:
    """Bind a schedule's hyper-parameters (the `run:` config keys of the same names); returns step -> lr.

    Each schedule reads only what it needs: `linear_warmup_cosine` and `constant` use warmup_steps,
    `warmup_linear_decay` uses warmup_ratio (required) and starts its warmup at warmup_lr.
    """
    if name == "linear_warmup_cosine":
        _check(total_steps, warmup_steps)
        return lambda step: linear_warmup_cosine(
            step, total_steps=total_steps, warmup_steps=warmup_steps, warmup_lr=warmup_lr, init_lr=init_lr,
            min_lr=min_lr,
        )
    if name == "warmup_linear_decay":
        if warmup_ratio is None:
            raise ValueError("run.lr_sched 'warmup_linear_decay' needs run.warmup_ratio (e.g. 0.1)")
        _check(total_steps, warmup_steps_from_ratio(total_steps, warmup_ratio))
        return lambda step: warmup_linear_decay(
            step, total_steps=total_steps, warmup_ratio=warmup_ratio, init_lr=init_lr, min_lr=min_lr,
            warmup_lr=warmup_lr,
        )
    if name == "constant":
        return lambda step: constant(step, init_lr=init_lr, warmup_steps=warmup_steps, warmup_lr=warmup_lr)
    raise ValueError(f"unknown run.lr_sched {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
