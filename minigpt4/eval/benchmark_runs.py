"""The two benchmark tasks as the evaluation entry point runs them: build prompts -> generate (batched,
sharded, resumable) -> score with the standalone scorers. Settings come from the `eval:` section
(minigpt4/eval/settings.py)."""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Optional

import torch

from minigpt4.common import dist
from minigpt4.common.jsonfiles import DataFileError, parse_json, read_text
from minigpt4.common.paths import join_inside
from minigpt4.datasets.images import BadImageError, load_rgb
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.feature_cache import FeatureInputModel, build_feature_source
from minigpt4.eval.generate import GenerationItem, generate_all
from minigpt4.eval.protocol_runs import ProtocolModel, ProtocolRun, resolve_run
from minigpt4.eval.settings import DEFAULT_TEMPLATE, EvalSettings, pope_question_file
from minigpt4.eval.vcd import ContrastiveModel, ImagePairs
from minigpt4.models.contrastive_decoding import ContrastiveDecoding
from minigpt4.processors.image import build_image_processor

log = logging.getLogger(__name__)

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
    split, rerun and projector sweep that shares the folder). With VCD (`decoding` given), each image comes with
    its distorted copy, and the model decodes the pair (minigpt4/eval/vcd.py)."""

    def __init__(self, model, settings: EvalSettings, decoding: Optional[ContrastiveDecoding] = None):
        self.loader = ImageLoader(settings)
        self.batch_size = settings.batch_size
        generation_config = getattr(getattr(model, "llm", None), "generation_config", None)
        if generation_config is not None:
            generation_config.use_cache = settings.use_cache
        self.sources = []
        if decoding is not None:
            pairs = ImagePairs(model, self.loader, decoding, settings.feature_cache, dict(settings.vis_processor))
            self.sources = pairs.sources
            self.model = ContrastiveModel(model, decoding, inputs_are_features=bool(pairs.sources))
            self.load_image = pairs
        elif settings.feature_cache is not None:
            source = build_feature_source(model, settings.feature_cache, dict(settings.vis_processor), self.loader)
            self.sources = [source]
            self.model, self.load_image = FeatureInputModel(model), source
        else:
            self.model, self.load_image = model, self.loader

    def prepare(self, items: list[GenerationItem]) -> None:
        """Encode the not-yet-cached images of `items` once, batched, each rank a share of them."""
        if not self.sources:
            return
        unique = list(dict.fromkeys(it.image for it in items))
        for source in self.sources:
            encoded = source.prefill(unique[dist.get_rank()::dist.get_world_size()], self.batch_size)
            log.info("feature cache: %d of %d images encoded now, the rest read from %s", encoded, len(unique),
                     source.cache.root)
        dist.barrier()


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
    result = {"protocol": run.label, "protocol_name": run.named.name, "protocol_source": run.named.source,
              "decoding": run.decoding_name}
    if run.overrides:
        result["protocol_overrides"] = run.overrides
    return result


def run_pope(model, settings: EvalSettings, out_dir: str, run: Optional[ProtocolRun] = None) -> dict:
    """With on_bad_image=skip, questions whose image could not be read get no answer; they are left out of
    the scores (a copy of the questions file without them is scored) and counted under "skipped"."""
    run = task_run(settings, "pope", run, model_template(model))
    inputs = GenerationInputs(model, settings, run.decoding)
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
    inputs = GenerationInputs(model, settings, run.decoding)
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
