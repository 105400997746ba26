"""Deterministic, resumable data order for training.

Map-style datasets: the order of an epoch is a pure function of (seed, epoch), so a resumed run can start at any
micro-batch by arithmetic, without loading the batches it skips.

    pass p of epoch e     = a permutation of the dataset seeded by (seed, e, p), cut to a multiple of
                            world_size × batch_size (the tail is dropped, like DistributedSampler(drop_last=True))
    micro-batch j of pass = the j-th block of world_size × batch_size indices; rank r takes the r-th batch_size
                            of them, so the ranks of one micro-step together read one contiguous slice

An epoch needs iters_per_epoch × grad_accum_steps micro-batches per rank; when that is more than one pass holds,
further passes (new permutations) follow. Every sample is loaded with torch/numpy/random seeded from
(seed, epoch, pass, index): its random augmentation is the same whichever rank or worker loads it and whether or
not the run was resumed. The collate_fn (which may draw, e.g. one random prompt per batch) runs seeded from
(seed, epoch, micro-batch position, rank). The loading process's own random stream is left untouched.

IterableDataset (webdataset mixing): the dataset shards the stream by rank and worker itself; an epoch is a fixed
number of micro-batches, the iterator is restarted if it runs dry, and workers are seeded from
(seed, rank, epoch, start position). A resumed run restarts the epoch's stream from a fresh seed rather than
replaying it (replaying would mean loading and discarding everything already consumed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from minigpt4.runners.rng import derive_seed, isolated_rng


def batches_per_pass(dataset_len: int, batch_size: int, world_size: int) -> int:
    """Micro-batches each rank gets from one pass over a map-style dataset (tail dropped)."""
    return dataset_len // (batch_size * world_size)


@dataclass(frozen=True)
class EpochSlice:
    """Which micro-batches one rank reads: those from `start` up to `num_batches` of `epoch`, `batch_size` samples
    each, as rank `rank` of `world_size`, in the order `seed` draws (dataset order when not `shuffle`)."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    num_batches: int
    start: int = 0
    shuffle: bool = True


class EpochBatchSampler(Sampler[tuple[tuple[tuple[int, int], ...], int]]):
    """Yields one rank's micro-batches of an epoch, those of `part` (an EpochSlice).

    Each element is a batch key (((dataset index, sample seed), ...), batch seed); `SeededBatches` turns it into
    a collated batch, loading each sample under its own seed and collating under the batch's seed.
    """

    def __init__(self, dataset_len: int, part: EpochSlice):
        self.per_pass = batches_per_pass(dataset_len, part.batch_size, part.world_size)
        if self.per_pass == 0:
            raise ValueError(
                f"dataset of {dataset_len} samples is smaller than one global micro-batch "
                f"(batch_size {part.batch_size} × world_size {part.world_size})"
            )
        if not 0 <= part.start <= part.num_batches:
            raise ValueError(f"start micro-batch {part.start} is outside [0, {part.num_batches}]")
        self.dataset_len, self.batch_size = dataset_len, part.batch_size
        self.rank, self.world_size = part.rank, part.world_size
        self.seed, self.epoch = part.seed, part.epoch
        self.num_batches, self.start, self.shuffle = part.num_batches, part.start, part.shuffle

    def __len__(self) -> int:
        return self.num_batches - self.start

    def _pass_order(self, pass_index: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_len)
        return np.random.default_rng([self.seed, self.epoch, pass_index]).permutation(self.dataset_len)

    def __iter__(self) -> Iterator[tuple[tuple[tuple[int, int], ...], int]]:
        global_batch = self.batch_size * self.world_size
        order, order_pass = None, -1
        for position in range(self.start, self.num_batches):
            pass_index, j = divmod(position, self.per_pass)
            if pass_index != order_pass:
                order, order_pass = self._pass_order(pass_index), pass_index
            begin = j * global_batch + self.rank * self.batch_size
            samples = tuple(
                (int(i), derive_seed(self.seed, self.epoch, pass_index, int(i)))
                for i in order[begin : begin + self.batch_size]
            )
            yield samples, derive_seed(self.seed, self.epoch, position, self.rank)


def _identity(batch: Any) -> Any:
    return batch


class SeededBatches(Dataset):
    """Wraps a map-style dataset and its collate_fn; item = one whole batch, loaded from a batch key.

    Each sample is loaded with torch-CPU/numpy/random seeded from its sample seed, and the collate_fn (which
    may draw too, e.g. a random prompt per batch) runs under the batch seed, so neither depends on which
    worker does the work nor on how many batches it did before, and the caller's random stream is untouched.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable | None):
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[tuple[tuple[int, int], ...], int]) -> Any:
        samples, batch_seed = key
        items = []
        for index, sample_seed in samples:
            with isolated_rng(sample_seed):
                items.append(self.dataset[index])
        with isolated_rng(batch_seed):
            return self.collate_fn(items)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: torch is already seeded per worker from the loader's generator; follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_micro_batches(
    dataset: Dataset,
    collate_fn: Callable | None,
    part: EpochSlice,
    *,
    num_workers: int,
    pin_memory: bool,
) -> Iterator[Any]:
    """Iterate over this rank's micro-batches of `part` (collated, on CPU)."""
    # The loader's own generator (not the global one) seeds its workers, so creating a loader mid-run on resume
    # consumes nothing from the training process's random stream.
    generator = torch.Generator().manual_seed(derive_seed(part.seed, part.rank, part.epoch, part.start))
    common = dict(
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
    )
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(part.epoch)
        loader = DataLoader(dataset, batch_size=part.batch_size, drop_last=True, **common)
        wanted, produced = part.num_batches - part.start, 0
        while produced < wanted:
            got_any = False
            for batch in loader:
                got_any = True
                yield batch
                produced += 1
                if produced == wanted:
                    return
            if not got_any:
                raise RuntimeError(f"the training IterableDataset ({type(dataset).__name__}) yielded no full batch "
                                   f"of {part.batch_size}")
        return

    sampler = EpochBatchSampler(len(dataset), part)  # type: ignore[arg-type]
    # batch_size=None: the sampler yields whole-batch keys and SeededBatches collates, so the loader must not.
    common["collate_fn"] = _identity
    yield from DataLoader(SeededBatches(dataset, collate_fn), sampler=sampler, batch_size=None, **common)
