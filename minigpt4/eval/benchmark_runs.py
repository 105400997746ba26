"""The benchmark items an evaluation asks for: POPE's questions and CHAIR's images, read from their files, each a
GenerationItem with its prompt under the task's protocol run (minigpt4/eval/protocol_runs.py) and its image; and the
checks made on them before the model is built. Settings come from the `eval:` section (minigpt4/eval/settings.py);
generating and scoring the items is minigpt4/eval/task_runs.py.

Each item carries its image file's SHA-256 (`image_sha256`, through provenance's HashCache: read once per change of
the file), so an answer stored for a picture since replaced under the same name is refused on resume."""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Optional

import torch

from minigpt4.common.config import ConfigError
from minigpt4.common.images import BadImageError, load_rgb
from minigpt4.common.jsonfiles import DataFileError, parse_json, read_text
from minigpt4.common.output_dir import human_bytes
from minigpt4.common.paths import join_inside
from minigpt4.common.provenance import HashCache
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.answer_files import CHAIR_CAPTIONS, IMAGE_HASH, pope_answers_name
from minigpt4.eval.bootstrap import DRAW_BYTES_PER_CELL, MAX_DRAW_BYTES
from minigpt4.eval.generate import GenerationItem
from minigpt4.eval.protocol_runs import ProtocolRun
from minigpt4.eval.settings import EvalSettings, pope_question_file
from minigpt4.processors.image import build_image_processor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# A CHAIR list entry: a COCO image id, or a file name ending in one (what the COCO file names are)
CHAIR_ENTRY = re.compile(r"(?:.*_)?([0-9]+)(?:\.(?:jpg|jpeg|png))?", re.IGNORECASE)
CHAIR_ENTRY_FORMS = ("a COCO image id (3001) or an image file name ending in one (000000003001.jpg, "
                     "COCO_val2014_000000003001.jpg; .jpg, .jpeg or .png)")


def resolve_image(image_dir: str, name: str | int, *, entry: str = "an entry", allow_outside: bool = False) -> str:
    """The image file of a POPE/CHAIR entry: a file name as given, or for a bare COCO id the val2014 name
    (COCO_val2014_000000xxxxxx.jpg) or the zero-padded one (000000xxxxxx.jpg), whichever exists. A name that
    leaves image_dir is refused (OutsideFolderError naming `entry`) unless `allow_outside`."""
    text = str(name)
    if not text.isdigit():
        return join_inside(image_dir, text, entry=entry, option="eval.allow_outside_image_dir", allow=allow_outside)
    candidates = [f"COCO_val2014_{int(text):012d}.jpg", f"{int(text):012d}.jpg"]
    for candidate in candidates:
        if os.path.exists(os.path.join(image_dir, candidate)):
            return os.path.join(image_dir, candidate)
    return os.path.join(image_dir, candidates[0])  # missing: the image loader reports it by this name


class ImageLoader:
    """path -> preprocessed tensor; bad images raise (on_bad_image=error) or return None and are counted."""

    def __init__(self, settings: EvalSettings):
        self.process = build_image_processor(settings.vis_processor)
        self.skip = settings.on_bad_image == "skip"
        self.skipped: list[str] = []

    def __call__(self, path: str) -> torch.Tensor | None:
        try:
            return self.process(load_rgb(path))
        except BadImageError as err:
            if not self.skip:
                raise
            log.warning("skipping %s", err)
            self.skipped.append(path)
            return None


def require_images(items: list[GenerationItem], settings: EvalSettings, what: str) -> None:
    """With on_bad_image=error, every image the items ask for must exist now, before the model is built; the
    message names the missing ones (with skip they are skipped one by one while generating)."""
    if settings.on_bad_image != "error":
        return
    missing = [path for path in dict.fromkeys(it.image for it in items) if not os.path.exists(path)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataFileError(f"eval.image_dir = {settings.image_dir}: {len(missing)} image(s) of {what} are missing: "
                            f"{shown} (eval.on_bad_image=skip leaves them out)")


def with_image_hashes(items: list[GenerationItem]) -> list[GenerationItem]:
    """Each item's image file's SHA-256 into its fields (stored with its answer and compared on resume), through
    provenance's HashCache (keyed by path, size and mtime: an image is read once per change, not once per run).
    A missing or not regular image gets None: the image loader reports or skips it when it is asked for."""
    cache = HashCache()
    digests: dict[str, Optional[str]] = {}
    for item in items:
        if item.image not in digests:
            digests[item.image] = cache.sha256(item.image) if os.path.isfile(item.image) else None
        item.extra[IMAGE_HASH] = digests[item.image]
    cache.save()
    return items


def pope_items(settings: EvalSettings, split: str, run: ProtocolRun) -> list[GenerationItem]:
    """One generation item per question of a POPE split, in the question file's order, prompted as `run` says."""
    q_path = pope_question_file(settings.pope, split)
    questions = pope_scorer.load_questions(q_path, require_text=True)
    items = [GenerationItem(
        key=str(q["question_id"]),
        image=resolve_image(settings.image_dir, q["image"], entry=f"{q_path}: question_id {q['question_id']!r}",
                            allow_outside=settings.allow_outside_image_dir),
        prompt=run.pope_prompt(q["text"]),
        extra={"question_id": q["question_id"], "image": q["image"]}) for q in questions]
    return with_image_hashes(items)


def chair_items(settings: EvalSettings, run: ProtocolRun) -> list[GenerationItem]:
    """One captioning item per CHAIR image of `run`; an empty image list is an error (nothing would be scored)."""
    names = chair_image_list(settings, run)
    source = run.images
    if not names:
        where = (f"eval.chair.images: {source} lists no images" if source is not None else
                 f"eval.image_dir: {settings.image_dir} has no .jpg/.jpeg/.png file to sample CHAIR images from")
        raise DataFileError(f"{where}; CHAIR needs at least one image")
    prompt = run.chair_prompt()
    items = []
    for name in names:
        image_id = chair_entry_id(name)  # checked by chair_image_list
        image = resolve_image(settings.image_dir, name, entry=f"eval.chair.images: {source}: entry {name!r}",
                              allow_outside=settings.allow_outside_image_dir)
        items.append(GenerationItem(key=str(image_id), image=image, prompt=prompt, extra={"image_id": image_id}))
    return with_image_hashes(items)


def planned_items(settings: EvalSettings, runs: dict[str, ProtocolRun]) -> dict[str, list[GenerationItem]]:
    """Answers file name -> its generation items, for every task (`runs`: task -> its protocol run) and split
    `settings` asks for; with on_bad_image=error a CHAIR image missing from eval.image_dir is an error here, before
    the model is built."""
    planned = {}
    if "pope" in settings.tasks:
        planned.update({pope_answers_name(split): pope_items(settings, split, runs["pope"])
                        for split in settings.pope.splits})
    if "chair" in settings.tasks:
        planned[CHAIR_CAPTIONS] = chair_items(settings, runs["chair"])
        require_images(planned[CHAIR_CAPTIONS], settings, f"eval.chair.protocol = {runs['chair'].label}")
    return planned





def chair_image_list(settings: EvalSettings, run: ProtocolRun) -> list[str]:
    """Image names for CHAIR under `run`: from a list file (the protocol's shipped one, or eval.chair.images), a
    caption JSON, or a seeded sample of image_dir; at most the protocol's (or eval.chair.num_images) many. Every
    entry must name a COCO image (CHAIR_ENTRY_FORMS) and no image twice: DataFileError naming the file and entry."""
    source, k = run.images, run.used.num_images
    if source is None:
        names = sorted(n for n in os.listdir(settings.image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
        check_chair_entries([(name, None) for name in names], f"eval.image_dir: {settings.image_dir}")
        return names if k is None or k >= len(names) else sorted(random.Random(run.used.sample_seed).sample(names, k))
    entries = _read_chair_list(source)
    check_chair_entries(entries, f"eval.chair.images: {source}")
    ids = [entry for entry, _ in entries]
    return ids if k is None else ids[:k]


def _read_chair_list(source: str) -> list[tuple[str, Optional[str]]]:
    """(entry, where it is) of a CHAIR list: a text file of one entry a line, or a JSON list of {"image_id"}
    objects (a caption file may name an image once per caption: an entry repeated as it is counts once)."""
    is_json = source.endswith(".json")
    try:
        text = read_text(source)
        rows = parse_json(text, source) if is_json else None
    except DataFileError as err:
        raise DataFileError(f"eval.chair.images: {err}") from None
    if is_json:
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "image_id" in r for r in rows):
            raise DataFileError(f"eval.chair.images: {source} must be a JSON list of objects with an image_id")
        entries = [(str(row["image_id"]), f"[{index}]") for index, row in enumerate(rows)]
    else:
        entries = [(line.strip(), f"line {number}") for number, line in enumerate(text.split("\n"), 1)
                   if line.strip()]
    first: dict[str, str] = {}
    return [(entry, where) for entry, where in entries if first.setdefault(entry, where) == where]


def chair_entry_id(entry: str) -> Optional[int]:
    """The COCO image id a CHAIR list entry names (None: it names none)."""
    match = CHAIR_ENTRY.fullmatch(Path(entry).name)
    return int(match.group(1)) if match else None


def check_chair_entries(entries: list[tuple[str, Optional[str]]], what: str) -> None:
    """Each (entry, where in the list: "line 3", "[2]" or None) names a COCO image, and no two name the same one
    ("3001" and "000000003001.jpg" would be one image asked twice under one key)."""
    seen: dict[int, str] = {}
    for entry, where in entries:
        image_id = chair_entry_id(entry)
        named = repr(entry) + (f" ({where})" if where else "")
        if image_id is None:
            raise DataFileError(f"{what}{f', {where}' if where else ''}: {entry!r} is not {CHAIR_ENTRY_FORMS}")
        if image_id in seen:
            raise DataFileError(f"{what}: {seen[image_id]} and {named} name the same image (COCO id {image_id}); "
                                "keep one of them")
        seen[image_id] = named


def check_bootstrap_size(settings: EvalSettings, planned: dict[str, list[GenerationItem]]) -> None:
    """eval.bootstrap must keep the scorers' draws within bootstrap.MAX_DRAW_BYTES for the images each task
    resamples (POPE's mean: every image of every split); the scorer would refuse it only after generation."""
    units = {"POPE": {str(it.extra.get("image")) for name, items in planned.items() if name != CHAIR_CAPTIONS
                      for it in items},
             "CHAIR": {it.key for it in planned.get(CHAIR_CAPTIONS, [])}}
    for task, images in units.items():
        per_resample = DRAW_BYTES_PER_CELL * len(images)  # a [resamples x images] int64 matrix and its float64 copy
        if images and settings.bootstrap * per_resample > MAX_DRAW_BYTES:
            raise ConfigError(
                f"eval.bootstrap = {settings.bootstrap}: resampling the {len(images)} images of {task} that many "
                f"times needs arrays of about {human_bytes(settings.bootstrap * per_resample)}; expected an integer "
                f"from 0 to {MAX_DRAW_BYTES // per_resample} for this run (arrays up to "
                f"{human_bytes(MAX_DRAW_BYTES)}; 1000 is usual)")
