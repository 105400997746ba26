"""Streaming image-caption shards (LAION, CC/SBU for MiniGPT-4 stage 1) and ratio mixing.

A shard is a tar file of samples `<key>.jpg` (or .jpeg/.png/.webp) + `<key>.json` (caption in
json["caption"]) or `<key>.txt`. Reading uses `webdataset`'s tar iterator; decoding is ours (`load_rgb`),
after the shuffle buffer, so the buffer holds compressed bytes rather than tensors.

Splitting: shard i goes to rank `i % world_size`, then, within a rank, to DataLoader worker
`j % num_workers` over that rank's list. Every (rank, worker) must get at least one shard.
With `repeat=True` (training by steps) each worker cycles over its shards forever, reshuffling their order
each pass; `repeat=False` reads them once (tests, counting).

Bad samples (unreadable/oversized image, missing image, missing or empty caption, damaged tar):
`on_bad_image="skip"` logs and counts them in `num_skipped` (shared with the workers); "error" raises naming
the shard and key.
"""
from __future__ import annotations

import json
import logging
import random
from typing import Any, Callable, Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from minigpt4.common.images import DEFAULT_MAX_PIXELS, BadImageError, SkipCounter, load_rgb
from minigpt4.datasets.caption import ON_BAD_IMAGE_CHOICES
from minigpt4.processors.image import process_seed

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSampleError(ValueError):
    """A shard sample that cannot become a training pair (no image or no caption)."""


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """"/data/{00000..00099}.tar" (brace pattern, "::"-separated alternatives) or a list -> list of URLs."""
    if isinstance(shards, str):
        return wds.shardlists.expand_urls(shards)
    if isinstance(shards, Sequence) and all(isinstance(s, str) for s in shards):
        return [url for pattern in shards for url in wds.shardlists.expand_urls(pattern)]
    raise ValueError(f"shards: expected a path pattern or a list of paths, got {shards!r}")


def _caption_of(raw: dict[str, Any], where: str) -> str:
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSampleError(f"{where}.json: malformed JSON ({err})") from None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str):
            return caption
        if "txt" not in raw:
            raise BadSampleError(f"{where}.json: no string field 'caption'")
    if "txt" in raw:
        try:
            return raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise BadSampleError(f"{where}.txt: not UTF-8 ({err})") from None
    raise BadSampleError(f"{where}: no caption (.json with 'caption' or .txt)")


class WebCaptionDataset(IterableDataset):
    """One shard set (e.g. LAION) as a stream of samples for this rank and worker (see the module docstring)."""

    def __init__(
        self,
        shards: str | Sequence[str],
        vis_processor: Callable,
        text_processor: Callable[[str], str],
        *,
        name: str = "webdataset",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 42,
        repeat: bool = True,
        shuffle_buffer: int = 1000,
        on_bad_image: str = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if on_bad_image not in ON_BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image: expected one of {ON_BAD_IMAGE_CHOICES}, got {on_bad_image!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.name = name
        self.all_shards = expand_shards(shards)
        self.rank_shards = self.all_shards[rank::world_size]
        # Checked against world_size (not this rank's share) so that every rank fails alike, instead of the
        # shard-less ranks failing while the others wait for them in the first collective.
        if len(self.all_shards) < world_size:
            raise ValueError(f"{name}: {len(self.all_shards)} shard(s) cannot feed {world_size} ranks; "
                             "every rank needs at least one shard")
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.rank = rank
        self.seed = seed
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        self._skips = SkipCounter()

    @property
    def num_skipped(self) -> int:
        return self._skips.value

    def worker_shards(self) -> list[str]:
        info = get_worker_info()
        if info is None:
            return list(self.rank_shards)
        shards = self.rank_shards[info.id::info.num_workers]
        if not shards:
            raise ValueError(f"{self.name}: rank {self.rank} has {len(self.rank_shards)} shard(s) for "
                             f"{info.num_workers} DataLoader workers; use at most {len(self.rank_shards)} workers")
        return shards

    def _handle(self, error: Exception) -> bool:
        """webdataset handler protocol: True = skip and continue; raising = stop."""
        if self.on_bad_image == "error":
            raise error
        total = self._skips.add()
        logger.warning("%s: skipping bad sample (%s); %d skipped so far", self.name, error, total)
        return True

    def _raw_passes(self, rng: random.Random, shards: list[str], pass_sizes: list[int]) -> Iterator[dict[str, Any]]:
        """Raw tar samples, one pass over `shards` (in a fresh random order) after another."""
        while True:
            order = list(shards)
            rng.shuffle(order)
            count = 0
            for raw in wds.tarfile_samples([{"url": url} for url in order], handler=self._handle):
                count += 1
                yield raw
            if count == 0:
                raise RuntimeError(f"{self.name}: shards {order[:3]}{'...' if len(order) > 3 else ''} hold no samples")
            pass_sizes.append(count)
            if not self.repeat:
                return

    def _to_sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_key is None:
            raise BadSampleError(f"{where}: no image (.{', .'.join(IMAGE_EXTENSIONS)})")
        caption = _caption_of(raw, where)
        answer = self.text_processor(caption)
        if answer == self.text_processor(""):  # nothing left after cleaning: a target of the end symbol alone
            raise BadSampleError(f"{where}: empty caption after cleaning ({caption!r})")
        image = load_rgb(raw[image_key], max_pixels=self.max_pixels, name=f"{where}.{image_key}")
        return {
            "image": self.vis_processor(image),
            "answer": answer,
            "instruction": None,
            "id": str(raw.get("__key__", "")),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = self.worker_shards()
        rng = random.Random(process_seed(self.seed) * 31 + self.rank)
        pass_sizes: list[int] = []
        raw_samples = self._raw_passes(rng, shards, pass_sizes)
        if self.shuffle_buffer > 1:
            raw_samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw_samples)
        failures_in_a_row = 0
        for raw in raw_samples:
            try:
                sample = self._to_sample(raw)
            except (BadImageError, BadSampleError) as err:
                self._handle(err)
                failures_in_a_row += 1
                # A whole pass (plus what the shuffle buffer held back) without one good sample: with
                # repeat=True this would spin forever, so stop with a clear error instead.
                if pass_sizes and failures_in_a_row > pass_sizes[0] + self.shuffle_buffer:
                    raise RuntimeError(f"{self.name}: no readable sample in a full pass over {len(shards)} "
                                       "shard(s); see the warnings above") from None
                continue
            failures_in_a_row = 0
            yield sample


class RatioMixDataset(IterableDataset):
    """Draws each next sample from source k with probability ratios[k] / sum(ratios).

    Stops as soon as any source runs out, so the mixture never silently drifts away from the ratios
    (with `repeat=True` webdataset sources it runs forever; the trainer counts steps).
    """

    def __init__(self, datasets: Sequence[IterableDataset], ratios: Sequence[float], seed: int = 42):
        if len(datasets) == 0 or len(datasets) != len(ratios):
            raise ValueError(f"mix_by_ratio: need one ratio per dataset, got {len(datasets)} datasets "
                             f"and {len(ratios)} ratios")
        for ratio in ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
                raise ValueError(f"mix_by_ratio: every sample_ratio must be a number > 0, got {list(ratios)}")
        self.datasets = list(datasets)
        self.ratios = [float(r) for r in ratios]
        self.seed = seed

    @property
    def num_skipped(self) -> int:
        return sum(getattr(d, "num_skipped", 0) for d in self.datasets)

    def __iter__(self) -> Iterator[Any]:
        rng = random.Random(process_seed(self.seed))
        iterators = [iter(d) for d in self.datasets]
        sources = range(len(iterators))
        while True:
            (chosen,) = rng.choices(sources, weights=self.ratios)
            try:
                yield next(iterators[chosen])
            except StopIteration:
                return


def mix_by_ratio(datasets: Sequence[IterableDataset], ratios: Sequence[float], seed: int = 42) -> RatioMixDataset:
    """MiniGPT-4 stage 1 mixes LAION : CC/SBU as 115 : 14."""
    return RatioMixDataset(datasets, ratios, seed)

