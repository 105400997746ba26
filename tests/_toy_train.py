"""A tiny end-to-end training run through Runner, for the torchrun / resume / kill tests in test_runner.py.

The toy mimics the real setting: a frozen encoder (kept in eval mode by the model's train() override) feeding a
trainable stochastic head that draws torch.randn noise in forward like the VIB projector, a dataset with a random
per-sample augmentation, and a collate_fn that draws a random "prompt" per sample.

    python tests/_toy_train.py OUT [--iters N] [--epochs E] [--accum K] [--resume] [--dump-dir D] ...
    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/_toy_train.py OUT ...

Rank 0 prints the summary as JSON on its last stdout line; with --dump-dir every rank writes rank{r}.pt holding
its trainable tensors and optimizer state.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from minigpt4.common import dist  # noqa: E402
from minigpt4.common.errors import USER_FACING_ERRORS  # noqa: E402
from minigpt4.models.checkpoints import trainable_tensors  # noqa: E402
from minigpt4.runners import checkpointing  # noqa: E402
from minigpt4.runners.config import RunConfig  # noqa: E402
from minigpt4.runners.runner import Runner  # noqa: E402

DIM, HIDDEN, NUM_PROMPTS = 6, 8, 4


class ToyModel(nn.Module):
    def __init__(self, noise: bool = True, step_sleep: float = 0.0, nan_calls: frozenset[int] = frozenset()):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.LayerNorm(HIDDEN))  # frozen
        self.encoder.requires_grad_(False)
        self.mean_head = nn.Linear(HIDDEN, 1)
        self.std_head = nn.Linear(HIDDEN, 1)
        self.prompt_bias = nn.Parameter(torch.zeros(NUM_PROMPTS))  # 1-D: no weight decay
        self.noise, self.step_sleep, self.nan_calls = noise, step_sleep, nan_calls
        self.calls = 0
        # --hold-after-step: this forward call waits until release() is true (the kill tests signal the run there)
        self.hold_call: int | None = None
        self.release: Callable[[], bool] = lambda: False

    def _hold(self, limit_s: float = 120.0) -> None:
        deadline = time.monotonic() + limit_s
        while not self.release():
            if time.monotonic() > deadline:
                raise RuntimeError(f"held at forward call {self.calls} for {limit_s:.0f} s and nobody released it")
            time.sleep(0.01)

    def train(self, mode: bool = True) -> "ToyModel":
        super().train(mode)
        self.encoder.eval()  # frozen parts stay in eval mode, as in the real models
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.hold_call:
            self._hold()
        if self.step_sleep:
            time.sleep(self.step_sleep)
        h = self.encoder(batch["x"])
        mu = self.mean_head(h).squeeze(-1)
        sigma = F.softplus(self.std_head(h).squeeze(-1))
        if self.noise:
            pred = mu + sigma * torch.randn_like(mu) + self.prompt_bias[batch["prompt"]]
        else:  # deterministic: no noise, and one bias shared by all prompts (DDP needs every parameter used)
            pred = mu + self.prompt_bias.mean()
        mse = F.mse_loss(pred, batch["y"])
        loss = mse + 1e-3 * sigma.mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return {"loss": loss, "mse": mse, "sigma": sigma.mean()}


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=g)
    y = x @ torch.randn(DIM, generator=g) + 0.1 * torch.randn(n, generator=g)
    return x, y


class ToyDataset(Dataset):
    def __init__(self, n: int = 64, augment: bool = True):
        self.x, self.y = make_data(n)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.augment:  # stands in for a random crop
            x = x + 0.05 * torch.randn(DIM)
        return {"x": x, "y": self.y[i]}


class ToyStream(IterableDataset):
    """An endless stream (like resampled webdataset shards), sharded by rank."""

    def __init__(self, n: int = 64):
        self.x, self.y = make_data(n)

    def __iter__(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        order = torch.randperm(len(self.x)).tolist()
        for i in order[rank::world]:
            yield {"x": self.x[i], "y": self.y[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.stack([it["x"] for it in items]),
        "y": torch.stack([it["y"] for it in items]),
        "prompt": torch.tensor([random.randrange(NUM_PROMPTS) for _ in items]),  # like MiniGPT-4's random prompt
        "num_tokens": torch.tensor(len(items) * 3),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--iters", type=int, default=4, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--stop-after", type=int, default=None, help="RunConfig.max_steps")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--no-save-every-epoch", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-noise", action="store_true", help="deterministic: no model noise, no augmentation")
    p.add_argument("--iterable", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds slept per forward (to be killable)")
    p.add_argument("--hold-after-step", type=int, default=None,
                   help="after this optimizer step, wait in the next forward until SIGTERM (or SIGKILL) comes")
    p.add_argument("--dump-dir", default=None)
    p.add_argument("--amp", default="none")
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--fail-save-at", type=int, default=None, help="rank 0's disk is full at this checkpoint step")
    return p.parse_args(argv)


def _fill_disk_at(step: int) -> None:
    """From here on, writing checkpoint `step`'s state file fails as on a full disk (ENOSPC)."""
    real_write = checkpointing._write_torch

    def write(obj, path):
        if checkpointing.checkpoint_dir_name(step) in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(obj, path)

    checkpointing._write_torch = write


def main(argv: list[str]) -> tuple[dict, Runner]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # bitwise comparisons between processes need the same reduction order
    torch.manual_seed(1234)  # the same initial weights on every rank and in every run
    model = ToyModel(noise=not args.no_noise, step_sleep=args.step_sleep)
    dataset = ToyStream() if args.iterable else ToyDataset(augment=not args.no_noise)
    cfg = RunConfig(
        output_dir=args.output_dir, seed=42, device="cpu", amp=args.amp,
        batch_size=args.batch_size, grad_accum_steps=args.accum, max_epoch=args.epochs,
        iters_per_epoch=args.iters, max_steps=args.stop_after,
        lr_sched="warmup_linear_decay", warmup_ratio=0.25, init_lr=5e-2, min_lr=1e-3, weight_decay=0.05,
        max_grad_norm=args.max_grad_norm, num_workers=args.num_workers, log_every=1,
        save_every_steps=args.save_every, save_every_epoch=not args.no_save_every_epoch,
        resume=args.resume, progress_bar=False,
    )
    runner = Runner(model, dataset, collate, cfg, config_to_save={"toy": True})
    if args.hold_after_step is not None:  # released by the runner's own SIGTERM flag
        model.hold_call = args.hold_after_step * args.accum + 1
        model.release = lambda: runner._preempt_requested
    if args.fail_save_at is not None and runner.rank == 0:
        _fill_disk_at(args.fail_save_at)
    summary = runner.train()
    if args.dump_dir:
        Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"trainable": {k: v.detach().clone() for k, v in trainable_tensors(model).items()},
             "optimizer": runner.optimizer.state_dict(), "rank": runner.rank, "world_size": runner.world_size},
            Path(args.dump_dir) / f"rank{runner.rank}.pt",
        )
    return summary, runner


if __name__ == "__main__":
    exit_code = 0
    try:
        result, run = main(sys.argv[1:])
    except USER_FACING_ERRORS as err:  # as train.py: the one-line message, exit 2
        print(f"error: rank {dist.get_rank()}: {err}", file=sys.stderr, flush=True)
        exit_code = 2
    else:
        if run.rank == 0:
            print(json.dumps(result), flush=True)
        del run  # the DDP wrapper must go before the process group (see dist.cleanup)
    dist.cleanup()  # also after an error: a live gloo group at interpreter exit aborts the process (SIGABRT)
    sys.exit(exit_code)
