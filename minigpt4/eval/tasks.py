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
from omegaconf import DictConfig, OmegaConf

from minigpt4.common import dist
from minigpt4.common.config import ConfigError
from minigpt4.conversation.conversation import format_eval_prompt
from minigpt4.datasets.images import BadImageError, load_rgb
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import GenerationItem, generate_all
from minigpt4.models.feature_cache import FeatureInputModel, build_feature_source
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
    # appended to every question; LLaVA-1.5's official POPE protocol uses
    # "\nAnswer the question using a single word or phrase."
    question_suffix: str = ""


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
    use_cache: bool = True  # KV cache during generation (switch off only to measure what it saves)
    feature_cache: Optional[str] = None  # folder of cached encoder outputs; null: encode every time
    on_bad_image: str = "error"  # error | skip
    bootstrap: int = 1000  # resamples for the confidence intervals (0: none)
    seed: int = 0
    pope: PopeSettings = field(default_factory=PopeSettings)
    chair: ChairSettings = field(default_factory=ChairSettings)


def validate_eval_settings(ev) -> None:
    """Value checks the types cannot express, run before the model is built (a bad batch size or prompt would
    otherwise fail only after loading 7B weights, or, for a prompt without {question}, not fail at all).
    `ev` is the `eval:` section (a DictConfig or an EvalSettings); raises ConfigError naming the key."""
    at_least = [("batch_size", ev.batch_size, 1), ("num_beams", ev.num_beams, 1), ("bootstrap", ev.bootstrap, 0),
                ("pope.max_new_tokens", ev.pope.max_new_tokens, 1),
                ("chair.max_new_tokens", ev.chair.max_new_tokens, 1)]
    if ev.chair.num_images is not None:
        at_least.append(("chair.num_images", ev.chair.num_images, 1))
    for key, value, low in at_least:
        if value < low:
            raise ConfigError(f"eval.{key} = {value}; expected an integer >= {low}")
    try:
        marker = "\x00question\x00"
        prompt = format_eval_prompt(ev.prompt_format, system="", question=marker)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"eval.prompt_format = {ev.prompt_format!r}: {err!r}; expected a format string with "
                          "{system}, {question} and <ImageHere> once") from None
    if marker not in prompt:
        raise ConfigError(f"eval.prompt_format = {ev.prompt_format!r} has no {{question}} field: every question "
                          "would get the same prompt")
    vis = OmegaConf.to_container(ev.vis_processor) if isinstance(ev.vis_processor, DictConfig) else ev.vis_processor
    try:
        build_image_processor(vis)
    except ValueError as err:
        raise ConfigError(f"eval.vis_processor.{err}") from None
    if "pope" in ev.tasks:
        splits = list(ev.pope.splits)
        if not splits or len(set(splits)) != len(splits):
            raise ConfigError(f"eval.pope.splits = {splits}; expected a non-empty list without repeats "
                              f"(of {', '.join(POPE_SPLITS)} for the shipped files)")
        for split in splits:
            if ev.pope.dir is None and split not in POPE_SPLITS:
                raise ConfigError(f"eval.pope.splits: unknown split {split!r}; the shipped question files are "
                                  f"{', '.join(POPE_SPLITS)} (or set eval.pope.dir)")
            try:
                path = pope_question_file(ev.pope, split)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if not os.path.isfile(path):
                where = "eval.pope.dir" if ev.pope.dir is not None else f"eval.pope.version = {ev.pope.version!r}"
                raise ConfigError(f"eval.pope.splits: no questions file {path} for split {split!r} ({where})")


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


class GenerationInputs:
    """How generate_all gets its images: preprocessed pixels, or with `eval.feature_cache` set, the encoder's
    outputs from the on-disk cache (each image encoded once, in batches, then reused by every question,
    split, rerun and projector sweep that shares the folder)."""

    def __init__(self, model, settings: EvalSettings):
        self.loader = ImageLoader(settings)
        self.batch_size = settings.batch_size
        generation_config = getattr(getattr(model, "llm", None), "generation_config", None)
        if generation_config is not None:
            generation_config.use_cache = settings.use_cache
        self.source = None
        if settings.feature_cache is not None:
            self.source = build_feature_source(model, settings.feature_cache, dict(settings.vis_processor),
                                               self.loader)
        self.model = FeatureInputModel(model) if self.source is not None else model
        self.load_image = self.source if self.source is not None else self.loader

    def prepare(self, items: list[GenerationItem]) -> None:
        """Encode the not-yet-cached images of `items` once, batched, each rank a share of them."""
        if self.source is None:
            return
        unique = list(dict.fromkeys(it.image for it in items))
        encoded = self.source.prefill(unique[dist.get_rank()::dist.get_world_size()], self.batch_size)
        dist.barrier()
        log.info("feature cache: %d of %d images encoded now, the rest read from %s", encoded, len(unique),
                 self.source.cache.root)


def run_pope(model, settings: EvalSettings, out_dir: str) -> dict:
    """With on_bad_image=skip, questions whose image could not be read get no answer; they are left out of
    the scores (a copy of the questions file without them is scored) and counted under "skipped"."""
    inputs = GenerationInputs(model, settings)
    question_files, answer_files, skipped = [], [], {}
    for split in settings.pope.splits:
        q_path = pope_question_file(settings.pope, split)
        questions = pope_scorer.load_questions(q_path, require_text=True)
        items = [GenerationItem(
            key=str(q["question_id"]), image=resolve_image(settings.image_dir, q["image"]),
            prompt=format_eval_prompt(settings.prompt_format, system=settings.system,
                                      question=q["text"] + settings.pope.question_suffix),
            extra={"question_id": q["question_id"], "image": q["image"]}) for q in questions]
        out_path = os.path.join(out_dir, f"pope_{split}_answers.jsonl")
        inputs.prepare(items)
        predictions = generate_all(
            inputs.model, items, out_path=out_path, load_image=inputs.load_image, batch_size=settings.batch_size,
            sort_by_length=settings.sort_by_length, desc=f"POPE {split}",
            generate_kwargs=dict(max_new_tokens=settings.pope.max_new_tokens, num_beams=settings.num_beams))
        unanswered = [q for q in questions if str(q["question_id"]) not in predictions]
        if unanswered and dist.get_rank() == 0:
            if len(unanswered) == len(questions):
                raise BadImageError(settings.image_dir, f"POPE {split}: no image could be read (see the warnings)")
            skipped[split] = {"questions": len(unanswered),
                              "images": sorted({str(q["image"]) for q in unanswered})}
            q_path = _write_answered_questions(questions, unanswered, q_path, out_dir, split)
        question_files.append(q_path)
        answer_files.append(out_path)
    if dist.get_rank() != 0:
        return {}
    result = pope_scorer.score_pope(question_files, answer_files, rule=settings.pope.rule,
                                    end_string=model.end_sym, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["pope_version"] = settings.pope.version if settings.pope.dir is None else settings.pope.dir
    if skipped:  # each split's warning was logged when its scored copy was written
        result["skipped"] = skipped
    print(pope_scorer.format_table(result))
    return result


def _write_answered_questions(questions: list[dict], unanswered: list[dict], source: str, out_dir: str,
                              split: str) -> str:
    """The questions of `source` minus the unanswered ones, as {out_dir}/pope_scored_questions/{split}.jsonl
    (the file stem is the split name the scorer reports)."""
    left_out = {str(q["question_id"]) for q in unanswered}
    folder = os.path.join(out_dir, "pope_scored_questions")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            if str(q["question_id"]) not in left_out:
                f.write(json.dumps(q) + "\n")
    log.warning("POPE %s: %d of %d questions have no answer (unreadable image, skipped); scoring %s instead of %s",
                split, len(unanswered), len(questions), path, source)
    return path


def chair_image_list(settings: EvalSettings) -> list[str]:
    """Image names for CHAIR: from a list file, a caption JSON, or a seeded sample of image_dir."""
    source = settings.chair.images
    if source is None:
        names = sorted(n for n in os.listdir(settings.image_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        k = settings.chair.num_images
        return names if k is None or k >= len(names) else sorted(random.Random(settings.chair.sample_seed).sample(names, k))
    if source.endswith(".json"):
        try:
            with open(source, encoding="utf-8") as f:
                rows = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"eval.chair.images: {source}:{err.lineno}:{err.colno}: malformed JSON: "
                             f"{err.msg}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "image_id" in r for r in rows):
            raise ValueError(f"eval.chair.images: {source} must be a JSON list of objects with an image_id")
        ids = list(dict.fromkeys(str(r["image_id"]) for r in rows))
    else:
        with open(source, encoding="utf-8") as f:
            ids = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    return ids if settings.chair.num_images is None else ids[: settings.chair.num_images]


def run_chair(model, settings: EvalSettings, out_dir: str) -> dict:
    inputs = GenerationInputs(model, settings)
    prompt = format_eval_prompt(settings.prompt_format, system=settings.system, question=settings.chair.question)
    items = []
    for name in chair_image_list(settings):
        image_id = chair_scorer.parse_image_id(Path(name).name)
        items.append(GenerationItem(key=str(image_id), image=resolve_image(settings.image_dir, name), prompt=prompt,
                                    extra={"image_id": image_id}))
    out_path = os.path.join(out_dir, "chair_captions.jsonl")
    inputs.prepare(items)
    predictions = generate_all(
        inputs.model, items, out_path=out_path, load_image=inputs.load_image, batch_size=settings.batch_size,
        sort_by_length=False, desc="CHAIR captions",
        generate_kwargs=dict(max_new_tokens=settings.chair.max_new_tokens, num_beams=settings.num_beams))
    if dist.get_rank() != 0:
        return {}
    skipped = sorted(it.image for it in items if it.key not in predictions)  # on_bad_image: skip
    if len(skipped) == len(items):
        raise BadImageError(settings.image_dir, "CHAIR: no image could be read (see the warnings)")
    scorer = chair_scorer.CHAIRScorer(settings.chair.synonyms)
    gt = chair_scorer.build_ground_truth(settings.chair.coco_annotations,
                                         cache=chair_scorer.default_cache_path(settings.chair.coco_annotations),
                                         scorer=scorer)
    rows = chair_scorer.load_captions(out_path, image_id_key="image_id", caption_key="answer")
    result = chair_scorer.score_captions(rows, gt, scorer=scorer, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["protocol"] = settings.chair.protocol or f"chair-{len(items)}img-{settings.chair.max_new_tokens}tok"
    result["captions_file"] = out_path
    if skipped:  # scored over the captions that exist; the protocol still names the images asked for
        result["skipped"] = {"images": len(skipped), "paths": skipped}
        log.warning("CHAIR: %d of %d images could not be read and have no caption (on_bad_image: skip)",
                    len(skipped), len(items))
    return result
