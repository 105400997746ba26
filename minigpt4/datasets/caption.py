"""Map-style image-caption datasets: the AdaVIB/LURE caption JSON and MiniGPT-4's cc_sbu_align.

Every sample is `{"image": FloatTensor[3, H, W], "answer": str, "instruction": str | None, "id": str}`;
`collate_samples` stacks a list of them. cc_sbu_align batches get one alignment prompt per batch from
`PromptPerBatchCollate`.

Bad images (`on_bad_image`):
  * "error": the first unreadable image raises `BadImageError` naming the file; files listed in the
    annotations but absent from disk raise already when the dataset is built.
  * "skip": absent files are dropped when the dataset is built (logged, listed in `missing_images`);
    an image that fails to load at `__getitem__` time is replaced by the next readable index (so batches keep
    their size), logged with its path, and counted in `num_skipped`. The count is shared with DataLoader
    workers, and counts skip events: a process that meets the same bad file again (a new epoch with
    non-persistent workers) counts it again. `num_bad_images` = missing + skipped.

Empty captions (nothing left after the text processor's cleaning, e.g. "" or "..."): the same policy. "error"
raises when the dataset is built, naming the file and entry; "skip" drops them then (logged, their ids listed
in `empty_captions`).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from minigpt4.common.files import NotRegularFileError, require_regular_file
from minigpt4.common.images import DEFAULT_MAX_PIXELS, BadImageError, SkipCounter, load_rgb
from minigpt4.common.jsonfiles import DataFileError, read_json
from minigpt4.common.paths import join_inside
from minigpt4.processors.image import process_seed

logger = logging.getLogger(__name__)

ON_BAD_IMAGE_CHOICES = ("skip", "error")
IMAGE_TAG = "<Img><ImageHere></Img>"  # the conversation template inserts it; prompt files may repeat it


@dataclass(frozen=True)
class CaptionRecord:
    image_path: Path
    caption: str
    sample_id: str


def _unusable_images(records: Sequence[CaptionRecord]) -> dict[int, str]:
    """Record index -> why its image file cannot be read, from file metadata alone (nothing is opened)."""
    unusable = {}
    for index, record in enumerate(records):
        try:
            require_regular_file(record.image_path, "image")
        except NotRegularFileError as err:
            unusable[index] = err.reason
    return unusable


def parse_caption_entries(entries: Any, source: str, where: str = "") -> list[tuple[str, str]]:
    """Check a list of {"image_id": int | str, "caption": str} and return (image_id, caption) pairs.

    Errors name the file, the entry index and the field. The same image_id may appear many times (COCO has
    about five captions per image); each entry is its own sample, so duplicates simply appear twice.
    """
    if not isinstance(entries, list):
        raise DataFileError(f"{source}{where}: expected a JSON list of {{\"image_id\", \"caption\"}} objects, "
                            f"got {type(entries).__name__}")
    pairs = []
    for index, entry in enumerate(entries):
        at = f"{source}{where}[{index}]"
        if not isinstance(entry, dict):
            raise DataFileError(f"{at}: expected an object with 'image_id' and 'caption', got {type(entry).__name__}")
        for field in ("image_id", "caption"):
            if field not in entry:
                raise DataFileError(f"{at}: missing field '{field}'")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or str(image_id).strip() == "":
            raise DataFileError(f"{at}.image_id: expected an integer or a non-empty string, got {image_id!r}")
        if not isinstance(caption, str):
            raise DataFileError(f"{at}.caption: expected a string, got {type(caption).__name__}")
        pairs.append((str(image_id), caption))
    return pairs


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-blank line; a leading "<Img><ImageHere></Img>" is removed (the template adds it)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompt file not found") from None
    prompts = []
    for line in lines:
        prompt = line.strip()
        if prompt.startswith(IMAGE_TAG):
            prompt = prompt[len(IMAGE_TAG):].strip()
        if prompt:
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected one instruction per line)")
    return prompts


class ImageCaptionDataset(Dataset):
    """Records of (image file, raw caption, id) -> processed samples, with the bad-image policy above."""

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        vis_processor: Callable,
        text_processor: Callable[[str], str],
        *,
        source: str,
        on_bad_image: str = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if on_bad_image not in ON_BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image: expected one of {ON_BAD_IMAGE_CHOICES}, got {on_bad_image!r}")
        self.source = source
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels

        unusable = _unusable_images(records)  # index -> why: missing, a FIFO, a link to /dev/zero, ...
        missing = [records[i] for i in unusable]
        if missing and on_bad_image == "error":
            first = next(iter(unusable))
            raise BadImageError(
                records[first].image_path,
                f"{unusable[first]} (listed in {source}; {len(missing)} of {len(records)} images are missing or "
                "not regular files; set on_bad_image: skip to train without them)",
            )
        if missing:
            first = next(iter(unusable))
            logger.warning("%s: %d of %d images are missing or not regular files and will be skipped, e.g. %s (%s)",
                           source, len(missing), len(records), records[first].image_path, unusable[first])
        # A caption that cleans to nothing would train the model to answer with the end symbol alone (a direct,
        # silent push towards shorter captions, which lowers CHAIR on its own): a bad sample, under the same
        # policy as a bad image. Compared with the processed empty string so a processor prompt is allowed for.
        empty_answer = text_processor("")
        empty = [(i, r) for i, r in enumerate(records) if text_processor(r.caption) == empty_answer]
        if empty and on_bad_image == "error":
            index, record = empty[0]
            raise DataFileError(
                f"{source}: entry {index} (image_id {record.sample_id}) has an empty caption after cleaning "
                f"({record.caption!r}); {len(empty)} of {len(records)} captions are empty. Fix or remove them, "
                "or set on_bad_image: skip to train without them"
            )
        if empty:
            logger.warning("%s: %d of %d captions are empty after cleaning and will be skipped, e.g. entry %d",
                           source, len(empty), len(records), empty[0][0])
        empty_index = {i for i, _ in empty}
        self.records = [r for i, r in enumerate(records) if i not in unusable and i not in empty_index]
        if not self.records:
            raise ValueError(f"{source}: no samples with an existing image file and a non-empty caption")
        self.missing_images = [str(r.image_path) for r in missing]
        self.empty_captions = [r.sample_id for _, r in empty]
        self._skips = SkipCounter()
        self._known_bad: set[int] = set()  # per process: don't decode a known-bad file twice

    @property
    def num_skipped(self) -> int:
        return self._skips.value

    @property
    def num_bad_images(self) -> int:
        return len(self.missing_images) + self.num_skipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self.records)
        for offset in range(count):
            position = (index + offset) % count
            if position in self._known_bad:
                continue
            record = self.records[position]
            try:
                image = load_rgb(record.image_path, max_pixels=self.max_pixels)
            except BadImageError as err:
                if self.on_bad_image == "error":
                    raise
                self._known_bad.add(position)
                total = self._skips.add()
                logger.warning("%s: skipping bad image %s (%s); %d skipped so far", self.source, err.path,
                               err.reason, total)
                continue
            return {
                "image": self.vis_processor(image),
                "answer": self.text_processor(record.caption),
                "instruction": None,
                "id": record.sample_id,
            }
        raise RuntimeError(f"{self.source}: none of the {count} images could be loaded (see the warnings above)")


def _image_records(pairs: list[tuple[str, str]], folder: str | os.PathLike, name_of: Callable[[str], str], *,
                   entry: str, option: str, allow_outside: bool) -> list[CaptionRecord]:
    """(image_id, caption) pairs -> records whose image is `folder`/`name_of(image_id)`; an image_id that would
    leave `folder` ("../../x", an absolute path) is refused naming `entry[index].image_id`, unless allowed."""
    return [CaptionRecord(Path(join_inside(folder, name_of(image_id), entry=f"{entry}[{index}].image_id",
                                           option=option, allow=allow_outside)), caption, image_id)
            for index, (image_id, caption) in enumerate(pairs)]


class CaptionJsonDataset(ImageCaptionDataset):
    """AdaVIB/LURE format: a JSON list of {"image_id", "caption"}; images are `{image_id:0>12}.jpg`.
    `allow_outside_image_dir`: accept image_ids that are absolute paths or climb out of image_dir."""

    def __init__(self, ann_path: str | os.PathLike, image_dir: str | os.PathLike, vis_processor: Callable,
                 text_processor: Callable[[str], str], *, allow_outside_image_dir: bool = False, **kwargs: Any):
        pairs = parse_caption_entries(read_json(ann_path), str(ann_path))
        records = _image_records(pairs, image_dir, lambda image_id: f"{image_id:0>12}.jpg", entry=str(ann_path),
                                 option="datasets.caption_json.allow_outside_image_dir",
                                 allow_outside=allow_outside_image_dir)
        super().__init__(records, vis_processor, text_processor, source=str(ann_path), **kwargs)


class CCSBUAlignDataset(ImageCaptionDataset):
    """MiniGPT-4 stage 2: `<storage>/filter_cap.json` ({"annotations": [...]}) + `<storage>/image/{id}.jpg`.

    The instruction is left None here; `PromptPerBatchCollate` gives each batch one prompt from `prompts`.
    """

    def __init__(self, storage: str | os.PathLike, prompt_path: str | os.PathLike, vis_processor: Callable,
                 text_processor: Callable[[str], str], *, allow_outside_image_dir: bool = False, **kwargs: Any):
        storage = Path(storage)
        ann_path = storage / "filter_cap.json"
        content = read_json(ann_path)
        if not isinstance(content, dict) or "annotations" not in content:
            raise DataFileError(f"{ann_path}: expected an object with an 'annotations' list")
        pairs = parse_caption_entries(content["annotations"], str(ann_path), ".annotations")
        records = _image_records(pairs, storage / "image", lambda image_id: f"{image_id}.jpg",
                                 entry=f"{ann_path}.annotations",
                                 option="datasets.cc_sbu_align.allow_outside_image_dir",
                                 allow_outside=allow_outside_image_dir)
        self.prompts = read_prompts(prompt_path)
        super().__init__(records, vis_processor, text_processor, source=str(ann_path), **kwargs)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of samples -> {"image": [B, 3, H, W], "answer": [...], "instruction": [...], "id": [...]}."""
    if len(samples) == 0:
        raise ValueError("collate_samples: empty batch")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_samples: images of different shapes in one batch {sorted(shapes)}; "
                         "all datasets of a run must use the same image_size")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "answer": [s["answer"] for s in samples],
        "instruction": [s["instruction"] for s in samples],
        "id": [s["id"] for s in samples],
    }


class PromptPerBatchCollate:
    """collate_samples + one prompt, drawn at random per batch, as the instruction of every row.

    Where the draw comes from (the same rule as the train image processor):
      * `seed=None`: torch's global RNG. The runner collates each batch under its own (seed, epoch, position)
        seed, so the prompt of every batch is reproducible, also after a resume; a plain DataLoader seeds
        worker RNGs from the main process, so `torch.manual_seed` makes the run reproducible there too.
      * `seed=<int>`: a private `random.Random(seed)` in the main process; in a DataLoader worker (where
        collation runs when num_workers > 0) it is re-seeded once per process via `process_seed`, so workers
        draw different prompt sequences.
    """

    def __init__(self, prompts: Sequence[str], seed: int | None = None):
        if not prompts:
            raise ValueError("PromptPerBatchCollate: need at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self._rng: random.Random | None = None
        self._rng_pid = -1

    def pick_prompt(self) -> str:
        if self.seed is None:
            return self.prompts[int(torch.randint(len(self.prompts), ()).item())]
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = random.Random(process_seed(self.seed))
            self._rng_pid = os.getpid()
        return self._rng.choice(self.prompts)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_samples(samples)
        batch["instruction"] = [self.pick_prompt()] * len(samples)
        return batch
