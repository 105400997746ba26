"""The two benchmark tasks as the evaluation entry point runs them: build prompts -> generate (batched,
sharded, resumable) -> score with the standalone scorers. Settings come from the `eval:` config section."""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch

from minigpt4.common import dist
from minigpt4.conversation.conversation import format_eval_prompt
from minigpt4.datasets.images import BadImageError, load_rgb
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import GenerationItem, generate_all
from minigpt4.processors.image import build_image_processor

log = logging.getLogger(__name__)

# The reference POPE/CHAIR system text (AdaVIB, OPERA) and prompt (SPEC §4).
REFERENCE_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. Please answer the question. ")
REFERENCE_PROMPT = "{system}###Human: <Img><ImageHere></Img> {question}###Assistant:"
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class PopeSettings:
    version: str = "coco-2023-08"  # coco-2023-08 (LLaVA-1.5 / AdaVIB) | coco-2023-10
    dir: Optional[str] = None  # folder with {split}.jsonl; default: the shipped files of `version`
    splits: list[str] = field(default_factory=lambda: list(POPE_SPLITS))
    rule: str = "reference"  # reference | first-sentence
    max_new_tokens: int = 10


@dataclass
class ChairSettings:
    images: Optional[str] = None  # .txt (one file name or id per line) or caption JSON; null: sample image_dir
    num_images: Optional[int] = 500  # sample size when `images` is null (OPERA: 500 random val2014 images)
    sample_seed: int = 0
    question: str = "Describe this image."
    max_new_tokens: int = 256
    coco_annotations: Optional[str] = None  # folder with instances_*2014.json and captions_*2014.json
    synonyms: Optional[str] = None  # default: the reference 80-category synonyms
    protocol: Optional[str] = None  # name in results; default "chair-{n}img-{max_new_tokens}tok"


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["pope", "chair"])
    output_dir: str = "out/eval"
    name: str = "model"  # model label in metrics.json and the results table
    image_dir: Optional[str] = None  # COCO val2014 images
    batch_size: int = 8
    device: str = "auto"
    system: str = REFERENCE_SYSTEM
    prompt_format: str = REFERENCE_PROMPT
    vis_processor: dict[str, Any] = field(default_factory=lambda: {"name": "blip2_image_eval", "image_size": 224})
    num_beams: int = 1
    sort_by_length: bool = True
    on_bad_image: str = "error"  # error | skip
    bootstrap: int = 1000  # resamples for the confidence intervals (0: none)
    seed: int = 0
    pope: PopeSettings = field(default_factory=PopeSettings)
    chair: ChairSettings = field(default_factory=ChairSettings)


def pope_question_file(settings: PopeSettings, split: str) -> str:
    if settings.dir is not None:
        return os.path.join(settings.dir, f"{split}.jsonl")
    shipped = resources.files("minigpt4.eval") / "data" / "pope" / settings.version / f"{split}.jsonl"
    if not shipped.is_file():
        raise ValueError(f"eval.pope.version = {settings.version!r}: no shipped file {shipped}; "
                         "expected coco-2023-08 or coco-2023-10, or set eval.pope.dir")
    return str(shipped)


def resolve_image(image_dir: str, name: str | int) -> str:
    """The image file of a POPE/CHAIR entry: a file name as given, or for a bare COCO id the val2014 name
    (COCO_val2014_000000xxxxxx.jpg) or the zero-padded one (000000xxxxxx.jpg), whichever exists."""
    text = str(name)
    if not text.isdigit():
        return os.path.join(image_dir, text)
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


def run_pope(model, settings: EvalSettings, out_dir: str) -> dict:
    loader = ImageLoader(settings)
    question_files, answer_files = [], []
    for split in settings.pope.splits:
        q_path = pope_question_file(settings.pope, split)
        questions = pope_scorer.load_questions(q_path)
        items = [GenerationItem(
            key=str(q["question_id"]), image=resolve_image(settings.image_dir, q["image"]),
            prompt=format_eval_prompt(settings.prompt_format, system=settings.system, question=q["text"]),
            extra={"question_id": q["question_id"], "image": q["image"]}) for q in questions]
        out_path = os.path.join(out_dir, f"pope_{split}_answers.jsonl")
        generate_all(model, items, out_path=out_path, load_image=loader, batch_size=settings.batch_size,
                     sort_by_length=settings.sort_by_length, desc=f"POPE {split}",
                     generate_kwargs=dict(max_new_tokens=settings.pope.max_new_tokens, num_beams=settings.num_beams))
        question_files.append(q_path)
        answer_files.append(out_path)
    if dist.get_rank() != 0:
        return {}
    result = pope_scorer.score_pope(question_files, answer_files, rule=settings.pope.rule,
                                    end_string=model.end_sym, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["pope_version"] = settings.pope.version if settings.pope.dir is None else settings.pope.dir
    print(pope_scorer.format_table(result))
    return result


def chair_image_list(settings: EvalSettings) -> list[str]:
    """Image names for CHAIR: from a list file, a caption JSON, or a seeded sample of image_dir."""
    source = settings.chair.images
    if source is None:
        names = sorted(n for n in os.listdir(settings.image_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        k = settings.chair.num_images
        return names if k is None or k >= len(names) else sorted(random.Random(settings.chair.sample_seed).sample(names, k))
    if source.endswith(".json"):
        with open(source, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "image_id" in r for r in rows):
            raise ValueError(f"eval.chair.images: {source} must be a JSON list of objects with an image_id")
        ids = list(dict.fromkeys(str(r["image_id"]) for r in rows))
    else:
        with open(source, encoding="utf-8") as f:
            ids = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    return ids if settings.chair.num_images is None else ids[: settings.chair.num_images]


def run_chair(model, settings: EvalSettings, out_dir: str) -> dict:
    loader = ImageLoader(settings)
    prompt = format_eval_prompt(settings.prompt_format, system=settings.system, question=settings.chair.question)
    items = []
    for name in chair_image_list(settings):
        image_id = chair_scorer.parse_image_id(Path(name).name)
        items.append(GenerationItem(key=str(image_id), image=resolve_image(settings.image_dir, name), prompt=prompt,
                                    extra={"image_id": image_id}))
    out_path = os.path.join(out_dir, "chair_captions.jsonl")
    generate_all(model, items, out_path=out_path, load_image=loader, batch_size=settings.batch_size,
                 sort_by_length=False, desc="CHAIR captions",
                 generate_kwargs=dict(max_new_tokens=settings.chair.max_new_tokens, num_beams=settings.num_beams))
    if dist.get_rank() != 0:
        return {}
    scorer = chair_scorer.CHAIRScorer(settings.chair.synonyms)
    gt = chair_scorer.build_ground_truth(settings.chair.coco_annotations,
                                         cache=chair_scorer.default_cache_path(settings.chair.coco_annotations),
                                         scorer=scorer)
    rows = chair_scorer.load_captions(out_path, image_id_key="image_id", caption_key="answer")
    result = chair_scorer.score_captions(rows, gt, scorer=scorer, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["protocol"] = settings.chair.protocol or f"chair-{len(items)}img-{settings.chair.max_new_tokens}tok"
    result["captions_file"] = out_path
    return result
