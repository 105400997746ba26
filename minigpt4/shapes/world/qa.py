"""Shapes-world training examples for the stage-0 base model: captions mixed with yes/no object questions.

The base model (`scripts/train_shapes_base.py`) learns two tasks from one shapes-world folder (as written by
`build_shapes_world`), both in the vicuna_v0 chat form the evaluation prompts use:

* captioning: "Describe this image." -> one of the image's reference captions (CHAIR's task);
* object questions: "Is there a star in the image?" -> "Yes, there is a star." / "No, there is no star."
  (POPE's task, in POPE's exact question wording). Half of the questions ask about a class in the image,
  half about a class drawn uniformly from the absent ones, so "yes" is never the safe answer.

Which task, caption and class an example gets is a function of (seed, epoch, index) only: a run is
reproducible and independent of batch size or data order. Images are decoded once, up front, and kept as
uint8 pixels (15000 images of 64 px are 184 MB), because re-decoding JPEGs would cost more than the tiny
model; each is normalised on access by the evaluation image processor, so training and evaluation see the
same tensors.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from minigpt4.common.files import require_regular_file
from minigpt4.common.images import load_rgb
from minigpt4.common.paths import join_inside
from minigpt4.processors.image import Blip2ImageEvalProcessor
from minigpt4.shapes.world.scenes import CLASS_NAMES, pope_question, with_article

CAPTION_INSTRUCTION = "Describe this image."


def object_question(name: str) -> str:
    """POPE's question for a class ("Is there an arrow in the image?"): training must use its exact words."""
    return pope_question(name)


def yes_answer(name: str) -> str:
    return f"Yes, there is {with_article(name)}."


def no_answer(name: str) -> str:
    # "No" is what POPE's reference rule reads as a negative answer (minigpt4.eval.pope.answer_to_label).
    return f"No, there is no {name}."


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; generate the world with "
                                "`python scripts/make_shapes_world.py --out <folder>`")
    require_regular_file(path, "shapes-world file")  # a FIFO would block read_text forever
    return json.loads(path.read_text(encoding="utf-8"))


class ShapesQADataset(Dataset):
    """One example per image per epoch: {"image": FloatTensor[3, S, S], "instruction", "answer", "id",
    "objects": FloatTensor[len(CLASS_NAMES)] (1 for each class in the image)}.

    root: a shapes-world folder; split: "train" or "val"; question_fraction: share of examples that are
    object questions (the rest are captions); call `set_epoch(e)` before each epoch to draw new examples.
    """

    def __init__(self, root: str | Path, split: str = "train", *, image_size: int = 64,
                 question_fraction: float = 0.5, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= question_fraction <= 1.0:
            raise ValueError(f"question_fraction is a probability in [0, 1], got {question_fraction}")
        root = Path(root)
        instances = _read_json(root / "annotations" / f"instances_{split}2014.json")
        captions = _read_json(root / "annotations" / f"captions_{split}2014.json")
        names = {c["id"]: c["name"] for c in instances["categories"]}
        unknown = sorted(set(names.values()) - set(CLASS_NAMES))
        if unknown:
            raise ValueError(f"{root}/annotations/instances_{split}2014.json: categories {unknown} are not "
                             f"shapes-world classes ({', '.join(CLASS_NAMES)})")
        present: dict[int, set[str]] = defaultdict(set)
        for ann in instances["annotations"]:
            present[ann["image_id"]].add(names[ann["category_id"]])
        by_image: dict[int, list[str]] = defaultdict(list)
        for ann in captions["annotations"]:
            by_image[ann["image_id"]].append(ann["caption"])

        self.image_ids = [img["id"] for img in instances["images"]]
        for image_id in self.image_ids:
            if not present[image_id] or not by_image[image_id]:
                raise ValueError(f"{root}/annotations: image {image_id} ({split}) has no objects or no captions")
        self.present = [sorted(present[i], key=CLASS_NAMES.index) for i in self.image_ids]
        self.captions = [by_image[i] for i in self.image_ids]
        self.objects = torch.zeros(len(self.image_ids), len(CLASS_NAMES))
        for row, classes in enumerate(self.present):
            self.objects[row, [CLASS_NAMES.index(c) for c in classes]] = 1.0
        self.process = Blip2ImageEvalProcessor(image_size)
        where = f"{root}/annotations/instances_{split}2014.json: images"
        paths = [join_inside(root / "images", str(img["file_name"]), entry=f"{where}[{i}].file_name", option=None)
                 for i, img in enumerate(instances["images"])]
        pixels = [np.asarray(load_rgb(path)) for path in paths]
        sizes = {p.shape for p in pixels}
        if len(sizes) != 1:
            raise ValueError(f"{root}/images: a shapes world has images of one size, found {sorted(sizes)}")
        self.pixels = np.stack(pixels)  # uint8 [N, H, W, 3]
        self.question_fraction = question_fraction
        self.seed = seed
        self.epoch = 0

    def image(self, index: int) -> torch.Tensor:
        """FloatTensor[3, S, S]: the pixels as evaluation feeds them to the model."""
        return self.process(Image.fromarray(self.pixels[index]))

    def images(self, indices: range | list[int]) -> torch.Tensor:
        return torch.stack([self.image(i) for i in indices])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def example_text(self, index: int) -> tuple[str, str]:
        """(instruction, answer) of image `index` in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if rng.random() >= self.question_fraction:
            captions = self.captions[index]
            return CAPTION_INSTRUCTION, captions[int(rng.integers(len(captions)))]
        present = self.present[index]
        if rng.random() < 0.5:
            name = present[int(rng.integers(len(present)))]
            return object_question(name), yes_answer(name)
        absent = [c for c in CLASS_NAMES if c not in present]
        name = absent[int(rng.integers(len(absent)))]
        return object_question(name), no_answer(name)

    def __getitem__(self, index: int) -> dict:
        instruction, answer = self.example_text(index)
        return {"image": self.image(index), "instruction": instruction, "answer": answer,
                "id": str(self.image_ids[index]), "objects": self.objects[index]}


def collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]),
            "instruction": [s["instruction"] for s in samples],
            "answer": [s["answer"] for s in samples],
            "id": [s["id"] for s in samples],
            "objects": torch.stack([s["objects"] for s in samples])}
