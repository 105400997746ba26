"""Seeding and RNG-state capture, so that a resumed run draws exactly the random numbers an uninterrupted one would.

Three generators matter: torch (CPU, and the current CUDA device), numpy's global one and Python's `random`.
States are stored as tensors and plain Python values only, so checkpoints load with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (e.g. seed, epoch, index); same parts -> same seed."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and random with the same value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU, current CUDA device (if any), numpy, random."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gauss)),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state()."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds a CUDA RNG state but this run has no GPU")
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with torch-CPU/numpy/random seeded from `seed`, then put the previous states back.

    Used around loading one sample: its random augmentation then depends only on `seed`, and the training
    process's own random stream (the model's noise) is left exactly as it was.
    """
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        # CPU generator only: torch.manual_seed would also reseed (and so disturb) the CUDA generators.
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
