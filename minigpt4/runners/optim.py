"""AdamW over the trainable parameters, with weight decay only where it makes sense."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters (requires_grad=True) into a decayed and a non-decayed group.

    Rule: parameters with ≥ 2 dimensions (weight matrices, embeddings) get `weight_decay`; 1-D and 0-D ones
    (biases, norm scales, the VIB prior's mean and log-scale vectors) get none, since shrinking them toward 0
    is not a regulariser but a bias. Each group carries `param_names` (kept in the optimizer's state_dict),
    which lets a resume check that the checkpoint's optimizer state belongs to the same parameters.
    Empty groups are left out.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {"params": [p for _, p in members], "param_names": [n for n, _ in members], "weight_decay": wd}
            )
    return groups


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def optimizer_param_names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    return [list(group.get("param_names", [])) for group in optimizer.param_groups]
