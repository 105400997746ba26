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
from minigpt4.common.config import ConfigError, check_paths
from minigpt4.common.files import NotRegularFileError, require_regular_file
from minigpt4.common.jsonfiles import DataFileError, parse_json, read_text
from minigpt4.common.paths import join_inside
from minigpt4.datasets.images import BadImageError, load_rgb
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import GenerationItem, generate_all
from minigpt4.eval.protocol_runs import ProtocolModel, ProtocolRun, protocol_runs, resolve_run
from minigpt4.models.feature_cache import FeatureInputModel, build_feature_source
from minigpt4.processors.image import build_image_processor

log = logging.getLogger(__name__)

# AdaVIB's POPE/CHAIR system text and this harness's one-string prompt (protocol single-string-pope's, MiniGPT-4).
REFERENCE_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. Please answer the question. ")
REFERENCE_PROMPT = "{system}###Human: <Img><ImageHere></Img> {question}###Assistant:"
POPE_SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "vicuna_v0"  # the prompt family when no model says otherwise (minigpt4/eval/protocol_runs.py)


@dataclass
class PopeSettings:
    version: str = "coco-2023-08"  # coco-2023-08 (LLaVA-1.5 / AdaVIB) | coco-2023-10
    dir: Optional[str] = None  # folder with {split}.jsonl; default: the shipped files of `version`
    splits: list[str] = field(default_factory=lambda: list(POPE_SPLITS))
    # A named protocol (python -m minigpt4.eval.protocols): prompt, tokenization, generation, answer rule. The keys
    # below are null = the protocol's; a value other than the protocol's is recorded as NAME+overrides.
    protocol: str = "single-string-pope"
    rule: Optional[str] = None  # reference | first-sentence
    max_new_tokens: Optional[int] = None
    question_suffix: Optional[str] = None  # appended to every question (llava15-pope: "\nAnswer the question …")
    question_cleaning: Optional[str] = None  # none | blip_caption (adavib-pope)


@dataclass
class ChairSettings:
    # A named protocol (python -m minigpt4.eval.protocols): prompt, images, generation, sentence handling. The keys
    # below are null = the protocol's; a value other than the protocol's is recorded as NAME+overrides.
    protocol: str = "describe-sampled-500"
    images: Optional[str] = None  # .txt (one file name or id per line) or caption JSON; adavib-chair needs one
    num_images: Optional[int] = None  # sample size (describe-sampled-500) or cap of the list
    sample_seed: Optional[int] = None
    question: Optional[str] = None
    max_new_tokens: Optional[int] = None
    sentences: Optional[str] = None  # keep | drop-unfinished | drop-unk (CHAIR sentence handling)
    coco_annotations: Optional[str] = None  # folder with instances_*2014.json and captions_*2014.json
    synonyms: Optional[str] = None  # default: the reference 80-category synonyms


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["pope", "chair"])
    output_dir: str = "out/eval"
    name: str = "model"  # model label in metrics.json and the results table
    image_dir: Optional[str] = None  # COCO val2014 images
    # true: a POPE `image` / CHAIR list entry may be an absolute path or climb out of image_dir with ".."
    allow_outside_image_dir: bool = False
    batch_size: int = 8
    device: str = "auto"
    system: Optional[str] = None  # null: each task's protocol's system text, prompt format and beams
    prompt_format: Optional[str] = None  # {system}, {question}, <ImageHere> once
    vis_processor: dict[str, Any] = field(default_factory=lambda: {"name": "blip2_image_eval", "image_size": 224})
    num_beams: Optional[int] = None
    sort_by_length: bool = True
    use_cache: bool = True  # KV cache during generation (switch off only to measure what it saves)
    feature_cache: Optional[str] = None  # folder of cached encoder outputs; null: encode every time
    on_bad_image: str = "error"  # error | skip
    bootstrap: int = 1000  # resamples for the confidence intervals (0: none)
    seed: int = 0
    # Mirrors of the results, as training's run.tensorboard / run.wandb (minigpt4/eval/eval_logging.py): metrics
    # and per-item tables to {output_dir}/tensorboard, and to a W&B run (offline unless WANDB_MODE says otherwise).
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "minigpt4-adavib"
    pope: PopeSettings = field(default_factory=PopeSettings)
    chair: ChairSettings = field(default_factory=ChairSettings)


def validate_eval_settings(ev, template: str = DEFAULT_TEMPLATE) -> None:
    """The `eval:` section's one validation, run before the model is built (a bad batch size or prompt would
    otherwise fail only after loading 7B weights, or, for a prompt without {question}, not fail at all).
    `ev` is the section (a DictConfig or an EvalSettings), `template` the model's prompt template (the protocols'
    prompt family); raises ConfigError naming the key."""
    _check_tasks_and_sources(ev)
    for key, value, low in [("batch_size", ev.batch_size, 1), ("bootstrap", ev.bootstrap, 0)]:
        if value < low:
            raise ConfigError(f"eval.{key} = {value}; expected an integer >= {low}")
    vis = OmegaConf.to_container(ev.vis_processor) if isinstance(ev.vis_processor, DictConfig) else ev.vis_processor
    try:
        build_image_processor(vis)
    except ValueError as err:
        raise ConfigError(f"eval.vis_processor.{err}") from None
    if "pope" in ev.tasks:
        _check_pope_splits(ev)
    protocol_runs(ev, template)  # the protocol keys (prompt, beams, new tokens, rule, images) on top of each named one


def _check_tasks_and_sources(ev) -> None:
    """eval.tasks, eval.on_bad_image, and the folders each task reads must exist."""
    unknown = sorted(set(ev.tasks) - {"pope", "chair"})
    if unknown or not ev.tasks:
        raise ConfigError(f"eval.tasks = {list(ev.tasks)}; expected a non-empty list of: pope, chair")
    if ev.image_dir is None:
        raise ConfigError("eval.image_dir must name the folder of evaluation images (e.g. COCO val2014)")
    check_paths(ev, ("image_dir",), prefix="eval")
    if ev.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"eval.on_bad_image = {ev.on_bad_image!r}; expected error or skip")
    if "chair" in ev.tasks:
        if ev.chair.coco_annotations is None:
            raise ConfigError("eval.chair.coco_annotations must name the folder with the COCO 2014 "
                              "instances_*/captions_* files (CHAIR ground truth)")
        check_paths(ev.chair, ("coco_annotations", "images", "synonyms"), prefix="eval.chair")
    if "pope" in ev.tasks:
        check_paths(ev.pope, ("dir",), prefix="eval.pope")


def _check_pope_splits(ev) -> None:
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
        if not os.path.exists(path):
            where = "eval.pope.dir" if ev.pope.dir is not None else f"eval.pope.version = {ev.pope.version!r}"
            raise ConfigError(f"eval.pope.splits: no questions file {path} for split {split!r} ({where})")
        try:  # a FIFO or a link to /dev/zero: say what it is (reading it would block)
            require_regular_file(path, f"POPE questions file for split {split!r}")
        except NotRegularFileError as err:
            raise ConfigError(f"eval.pope.splits: {err}") from None


def pope_question_file(settings: PopeSettings, split: str) -> str:
    if settings.dir is not None:
        return os.path.join(settings.dir, f"{split}.jsonl")
    shipped = resources.files("minigpt4.eval") / "data" / "pope" / settings.version / f"{split}.jsonl"
    if not shipped.is_file():
        raise ValueError(f"eval.pope.version = {settings.version!r}: no shipped file {shipped}; "
                         "expected coco-2023-08 or coco-2023-10, or set eval.pope.dir")
    return str(shipped)


def files_to_record(settings: EvalSettings) -> dict[str, str]:
    """`eval.<key>` -> path of every benchmark file the `eval:` section reads, for provenance.json: image_dir,
    the POPE question files of the splits run, CHAIR's image list, annotation files and synonyms."""
    found: dict[str, str] = {}
    if settings.image_dir:
        found["eval.image_dir"] = str(settings.image_dir)
    if "pope" in settings.tasks:
        for split in settings.pope.splits or POPE_SPLITS:
            found[f"eval.pope.{split}"] = pope_question_file(settings.pope, split)
    if "chair" in settings.tasks:
        chair = settings.chair
        if chair.images:
            found["eval.chair.images"] = str(chair.images)
        if chair.coco_annotations:
            found.update(_coco_annotation_files(str(chair.coco_annotations)))
        found["eval.chair.synonyms"] = str(chair.synonyms or
                                           resources.files("minigpt4.eval") / "data" / "chair_synonyms.txt")
    return found


def _coco_annotation_files(folder: str) -> dict[str, str]:
    """The instances/captions files CHAIR reads (hashed), not the whole annotations folder (GBs of others)."""
    try:
        files = chair_scorer.find_annotation_files(folder)
    except FileNotFoundError:
        return {"eval.chair.coco_annotations": folder}
    return {f"eval.chair.coco_annotations/{p.name}": str(p) for kind in ("instances", "captions") for p in files[kind]}


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


CHAIR_CAPTIONS = "chair_captions.jsonl"


def pope_answers_name(split: str) -> str:
    return f"pope_{split}_answers.jsonl"


def task_run(settings: EvalSettings, task: str, run: Optional[ProtocolRun] = None,
             template: str = DEFAULT_TEMPLATE) -> ProtocolRun:
    """`run` if given, else `task`'s protocol run under `settings` for a model of prompt `template`."""
    return run if run is not None else resolve_run(settings, task, template)


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


def pope_items(settings: EvalSettings, split: str,
               run: Optional[ProtocolRun] = None) -> tuple[str, list[dict], list[GenerationItem]]:
    """(question file, its questions, one generation item per question) of a POPE split under `run`."""
    run = task_run(settings, "pope", run)
    q_path = pope_question_file(settings.pope, split)
    questions = pope_scorer.load_questions(q_path, require_text=True)
    items = [GenerationItem(
        key=str(q["question_id"]),
        image=resolve_image(settings.image_dir, q["image"], entry=f"{q_path}: question_id {q['question_id']!r}",
                            allow_outside=settings.allow_outside_image_dir),
        prompt=run.pope_prompt(q["text"]),
        extra={"question_id": q["question_id"], "image": q["image"]}) for q in questions]
    return q_path, questions, items


def chair_items(settings: EvalSettings, run: Optional[ProtocolRun] = None) -> list[GenerationItem]:
    """One captioning item per CHAIR image of `run`; an empty image list is an error (nothing would be scored)."""
    run = task_run(settings, "chair", run)
    names = chair_image_list(settings, run)
    source = run.images
    if not names:
        where = (f"eval.chair.images: {source} lists no images" if source is not None else
                 f"eval.image_dir: {settings.image_dir} has no .jpg/.jpeg/.png file to sample CHAIR images from")
        raise DataFileError(f"{where}; CHAIR needs at least one image")
    prompt = run.chair_prompt()
    items = []
    for name in names:
        image_id = chair_scorer.parse_image_id(Path(name).name)
        image = resolve_image(settings.image_dir, name, entry=f"eval.chair.images: {source}: entry {name!r}",
                              allow_outside=settings.allow_outside_image_dir)
        items.append(GenerationItem(key=str(image_id), image=image, prompt=prompt, extra={"image_id": image_id}))
    return items


def planned_items(settings: EvalSettings,
                  runs: Optional[dict[str, ProtocolRun]] = None) -> dict[str, list[GenerationItem]]:
    """Answers file name -> its generation items, for every task and split `settings` asks for; with
    on_bad_image=error a CHAIR image missing from eval.image_dir is an error here, before the model is built."""
    runs = runs or {}
    planned = {}
    if "pope" in settings.tasks:
        planned.update({pope_answers_name(split): pope_items(settings, split, runs.get("pope"))[2]
                        for split in settings.pope.splits})
    if "chair" in settings.tasks:
        run = task_run(settings, "chair", runs.get("chair"))
        planned[CHAIR_CAPTIONS] = chair_items(settings, run)
        require_images(planned[CHAIR_CAPTIONS], settings, f"eval.chair.protocol = {run.label}")
    return planned


def model_template(model) -> str:
    template = getattr(model, "template", None)
    return getattr(template, "name", DEFAULT_TEMPLATE)


def protocol_result(run: ProtocolRun) -> dict:
    """The protocol fields of a task's result: label, name, source and the overridden keys."""
    result = {"protocol": run.label, "protocol_name": run.named.name, "protocol_source": run.named.source}
    if run.overrides:
        result["protocol_overrides"] = run.overrides
    return result


def run_pope(model, settings: EvalSettings, out_dir: str, run: Optional[ProtocolRun] = None) -> dict:
    """With on_bad_image=skip, questions whose image could not be read get no answer; they are left out of
    the scores (a copy of the questions file without them is scored) and counted under "skipped"."""
    run = task_run(settings, "pope", run, model_template(model))
    inputs = GenerationInputs(model, settings)
    question_files, answer_files, skipped = [], [], {}
    for split in settings.pope.splits:
        q_path, questions, items = pope_items(settings, split, run)
        out_path = os.path.join(out_dir, pope_answers_name(split))
        inputs.prepare(items)
        predictions = generate_all(
            ProtocolModel(inputs.model, run), items, out_path=out_path, load_image=inputs.load_image,
            batch_size=settings.batch_size, sort_by_length=settings.sort_by_length, desc=f"POPE {split}",
            generate_kwargs=run.generate_kwargs())
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
    result = pope_scorer.score_pope(question_files, answer_files, rule=run.used.answer_rule,
                                    end_string=model.end_sym, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["pope_version"] = settings.pope.version if settings.pope.dir is None else settings.pope.dir
    result.update(protocol_result(run))
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


def chair_image_list(settings: EvalSettings, run: Optional[ProtocolRun] = None) -> list[str]:
    """Image names for CHAIR under `run`: from a list file (the protocol's shipped one, or eval.chair.images), a
    caption JSON, or a seeded sample of image_dir; at most the protocol's (or eval.chair.num_images) many."""
    run = task_run(settings, "chair", run)
    source, k = run.images, run.used.num_images
    if source is None:
        names = sorted(n for n in os.listdir(settings.image_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        return names if k is None or k >= len(names) else sorted(random.Random(run.used.sample_seed).sample(names, k))
    is_json = source.endswith(".json")
    try:
        text = read_text(source)
        rows = parse_json(text, source) if is_json else None
    except DataFileError as err:
        raise DataFileError(f"eval.chair.images: {err}") from None
    if is_json:
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "image_id" in r for r in rows):
            raise DataFileError(f"eval.chair.images: {source} must be a JSON list of objects with an image_id")
        ids = list(dict.fromkeys(str(r["image_id"]) for r in rows))
    else:
        ids = list(dict.fromkeys(line.strip() for line in text.split("\n") if line.strip()))
    return ids if k is None else ids[:k]


def run_chair(model, settings: EvalSettings, out_dir: str, run: Optional[ProtocolRun] = None) -> dict:
    run = task_run(settings, "chair", run, model_template(model))
    inputs = GenerationInputs(model, settings)
    items = chair_items(settings, run)
    out_path = os.path.join(out_dir, CHAIR_CAPTIONS)
    inputs.prepare(items)
    predictions = generate_all(
        ProtocolModel(inputs.model, run), items, out_path=out_path, load_image=inputs.load_image,
        batch_size=settings.batch_size, sort_by_length=False, desc="CHAIR captions",
        generate_kwargs=run.generate_kwargs())
    if dist.get_rank() != 0:
        return {}
    skipped = sorted(it.image for it in items if it.key not in predictions)  # on_bad_image: skip
    if len(skipped) == len(items):
        raise BadImageError(settings.image_dir, "CHAIR: no image could be read (see the warnings)")
    scorer = chair_scorer.CHAIRScorer(settings.chair.synonyms)
    gt = chair_scorer.build_ground_truth(settings.chair.coco_annotations,
                                         cache=chair_scorer.default_cache_path(settings.chair.coco_annotations),
                                         scorer=scorer)
    rows = [dict(row, caption=run.caption_for_scoring(row["caption"]))  # the protocol's sentence handling
            for row in chair_scorer.load_captions(out_path, image_id_key="image_id", caption_key="answer")]
    result = chair_scorer.score_captions(rows, gt, scorer=scorer, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result.update(protocol_result(run))
    result["sentences"] = run.used.sentences
    result["captions_file"] = out_path
    if skipped:  # scored over the captions that exist; the protocol still names the images asked for
        result["skipped"] = {"images": len(skipped), "paths": skipped}
        log.warning("CHAIR: %d of %d images could not be read and have no caption (on_bad_image: skip)",
                    len(skipped), len(items))
    return result
