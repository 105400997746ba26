"""Learning-rate schedules against their closed forms; AdamW parameter groups by rule."""
import math

import pytest
import torch
from torch import nn

from minigpt4.runners.optim import param_groups
from minigpt4.runners.schedules import (
    constant,
    linear_warmup_cosine,
    make_lr_schedule,
    warmup_linear_decay,
    warmup_steps_from_ratio,
)

# MiniGPT-4 stage 2: 1e-6 -> 3e-5 over 200 steps, cosine to 1e-5 at step 1000.
COS = dict(total_steps=1000, warmup_steps=200, warmup_lr=1e-6, init_lr=3e-5, min_lr=1e-5)


def test_linear_warmup_cosine_closed_form():
    assert linear_warmup_cosine(0, **COS) == pytest.approx(1e-6)
    assert linear_warmup_cosine(100, **COS) == pytest.approx(1e-6 + (3e-5 - 1e-6) * 0.5)
    assert linear_warmup_cosine(200, **COS) == pytest.approx(3e-5)  # end of warmup
    assert linear_warmup_cosine(600, **COS) == pytest.approx((3e-5 + 1e-5) / 2)  # middle of the cosine
    assert linear_warmup_cosine(1000, **COS) == pytest.approx(1e-5)  # end
    t = (999 - 200) / 800
    assert linear_warmup_cosine(999, **COS) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * t)))
    assert linear_warmup_cosine(5000, **COS) == pytest.approx(1e-5)  # past the end: stays at min_lr


def test_linear_warmup_cosine_is_monotone_after_warmup():
    lrs = [linear_warmup_cosine(s, **COS) for s in range(200, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# AdaVIB: 5000 pairs / (2 x 8) = 312 steps, 10% warmup, lr 3e-5, decay to 1e-7.
LIN = dict(total_steps=312, warmup_ratio=0.1, init_lr=3e-5, min_lr=1e-7)


def test_warmup_linear_decay_closed_form():
    w = warmup_steps_from_ratio(312, 0.1)
    assert w == 32  # ceil(31.2)
    assert warmup_linear_decay(0, **LIN) == 0.0
    assert warmup_linear_decay(16, **LIN) == pytest.approx(3e-5 * 16 / 32)
    assert warmup_linear_decay(w, **LIN) == pytest.approx(3e-5)  # end of warmup
    assert warmup_linear_decay((w + 312) // 2, **LIN) == pytest.approx((3e-5 + 1e-7) / 2)  # middle of the decay
    assert warmup_linear_decay(311, **LIN) == pytest.approx(1e-7 + (3e-5 - 1e-7) / 280)
    assert warmup_linear_decay(312, **LIN) == pytest.approx(1e-7)  # end
    assert warmup_linear_decay(0, **LIN, warmup_lr=1e-6) == pytest.approx(1e-6)


def test_constant_and_dispatch():
    assert constant(0, init_lr=1e-4) == 1e-4
    assert constant(5, init_lr=1e-4, warmup_steps=10) == pytest.approx(5e-5)
    sched = make_lr_schedule("linear_warmup_cosine", warmup_ratio=None, **COS)
    assert sched(600) == linear_warmup_cosine(600, **COS)
    sched = make_lr_schedule("warmup_linear_decay", warmup_lr=0.0, warmup_steps=0, **LIN)
    assert sched(100) == warmup_linear_decay(100, **LIN)
    with pytest.raises(ValueError, match="warmup_ratio"):
        make_lr_schedule("warmup_linear_decay", total_steps=10, init_lr=1, min_lr=0, warmup_lr=0, warmup_steps=0,
                         warmup_ratio=None)
    with pytest.raises(ValueError, match="valid: linear_warmup_cosine"):
        make_lr_schedule("cosine", total_steps=10, init_lr=1, min_lr=0, warmup_lr=0, warmup_steps=0,
                         warmup_ratio=None)
    with pytest.raises(ValueError, match="warmup steps"):
        linear_warmup_cosine(0, total_steps=10, warmup_steps=20, warmup_lr=0, init_lr=1, min_lr=0)


class _Projector(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.llama_proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.prior_mu = nn.Parameter(torch.zeros(8))
        self.table = nn.Parameter(torch.zeros(3, 2, 2))
        self.scale = nn.Parameter(torch.tensor(1.0))


def test_param_groups_decay_only_matrices():
    model = _Projector()
    groups = param_groups(model, weight_decay=0.05)
    by_wd = {g["weight_decay"]: set(g["param_names"]) for g in groups}
    assert by_wd == {
        0.05: {"llama_proj.weight", "table"},
        0.0: {"llama_proj.bias", "norm.weight", "norm.bias", "prior_mu", "scale"},
    }
    for g in groups:  # names and tensors line up
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"]))
    # every trainable parameter exactly once, no frozen one
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(groups, lr=1e-3)  # accepted by the optimizer as is


def test_param_groups_without_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(model, 0.05)
