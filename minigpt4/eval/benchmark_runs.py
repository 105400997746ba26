"""The two benchmark tasks as the evaluation entry point runs them: build prompts -> generate (batched,
sharded, resumable) -> score with the standalone scorers. Settings come from the `eval:` section
(minigpt4/eval/settings.py).

Each item carries its image file's SHA-256 (`image_sha256`, through provenance's HashCache: read once per change of
the file), so an answer stored for a picture since replaced under the same name is refused on resume. Only the items
asked are scored; answers stored for other items (a larger earlier run) stay in the answers file and are counted
in the result as `stored_answers_not_in_this_run`."""
from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Optional

import torch

from minigpt4.common import dist
from minigpt4.common.config import ConfigError
from minigpt4.common.images import BadImageError, load_rgb
from minigpt4.common.jsonfiles import DataFileError, parse_json, read_text
from minigpt4.common.output_dir import human_bytes
from minigpt4.common.paths import join_inside
from minigpt4.common.provenance import HashCache
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.bootstrap import DRAW_BYTES_PER_CELL, MAX_DRAW_BYTES
from minigpt4.eval.decodings import Decoding
from minigpt4.eval.feature_cache import FeatureInputModel, build_feature_source
from minigpt4.eval.generate import IMAGE_HASH, GenerationItem, check_prompt_lengths, generate_all, stored_elsewhere
from minigpt4.eval.opera import OperaGenerator
from minigpt4.eval.protocol_runs import ProtocolModel, ProtocolRun, resolve_run
from minigpt4.eval.settings import DEFAULT_TEMPLATE, EvalSettings, pope_question_file
from minigpt4.eval.vcd import ContrastiveModel, ImagePairs
from minigpt4.models.contrastive_decoding import ContrastiveDecoding
from minigpt4.models.opera import OperaDecoding
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


class GenerationInputs:
    """How generate_all gets its images: preprocessed pixels, or with `eval.feature_cache` set, the encoder's
    outputs from the on-disk cache (each image encoded once, in batches, then reused by every question,
    split, rerun and projector sweep that shares the folder). With VCD (`decoding` a ContrastiveDecoding), each
    image comes with its distorted copy, and the model decodes the pair (minigpt4/eval/vcd.py); with OPERA (an
    OperaDecoding) the model decodes with OPERA (minigpt4/eval/opera.py)."""

    def __init__(self, model, settings: EvalSettings, decoding: Optional[Decoding] = None):
        self.loader = ImageLoader(settings)
        self.batch_size = settings.batch_size
        generation_config = getattr(getattr(model, "llm", None), "generation_config", None)
        if generation_config is not None:
            generation_config.use_cache = settings.use_cache
        self.sources = []
        if isinstance(decoding, ContrastiveDecoding):
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
        if isinstance(decoding, OperaDecoding):
            self.model = OperaGenerator(model, decoding, inputs_are_features=bool(self.sources))

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
    return q_path, questions, with_image_hashes(items)


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
        image_id = chair_entry_id(name)  # checked by chair_image_list
        image = resolve_image(settings.image_dir, name, entry=f"eval.chair.images: {source}: entry {name!r}",
                              allow_outside=settings.allow_outside_image_dir)
        items.append(GenerationItem(key=str(image_id), image=image, prompt=prompt, extra={"image_id": image_id}))
    return with_image_hashes(items)


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
    question_files, answer_files, skipped, elsewhere = [], [], {}, {}
    for split in settings.pope.splits:
        q_path, questions, items = pope_items(settings, split, run)
        out_path = os.path.join(out_dir, pope_answers_name(split))
        inputs.prepare(items)
        predictions = generate_all(
            ProtocolModel(inputs.model, run), items, out_path=out_path, load_image=inputs.load_image,
            batch_size=settings.batch_size, sort_by_length=settings.sort_by_length, desc=f"POPE {split}",
            generate_kwargs=run.generate_kwargs())
        if dist.get_rank() != 0:
            continue
        unanswered = [q for q in questions if str(q["question_id"]) not in predictions]
        if unanswered:
            if len(unanswered) == len(questions):
                raise BadImageError(settings.image_dir, f"POPE {split}: no image could be read (see the warnings)")
            skipped[split] = {"questions": len(unanswered),
                              "images": sorted({str(q["image"]) for q in unanswered})}
            q_path = _write_answered_questions(questions, unanswered, q_path, out_dir, split)
        elsewhere[split] = stored_elsewhere(out_path, items)
        question_files.append(q_path)
        answer_files.append(_scored_answers(out_path, items, predictions, elsewhere[split], out_dir, split))
    if dist.get_rank() != 0:
        return {}
    result = pope_scorer.score_pope(question_files, answer_files, rule=run.used.answer_rule,
                                    end_string=model.end_sym, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result["pope_version"] = settings.pope.version if settings.pope.dir is None else settings.pope.dir
    result.update(protocol_result(run))
    if skipped:  # each split's warning was logged when its scored copy was written
        result["skipped"] = skipped
    result["stored_answers_not_in_this_run"] = elsewhere
    print(pope_scorer.format_table(result))
    return result


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """`rows` as a JSONL file, atomically (a scored copy is rewritten by every run)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def _scored_answers(out_path: str, items: list[GenerationItem], predictions: dict[str, dict], elsewhere: int,
                    out_dir: str, split: str) -> str:
    """The answers file POPE scores: `out_path` itself, or where it also keeps answers to questions this run did
    not ask, a copy of the asked ones at {out_dir}/pope_scored_answers/{split}.jsonl (the scorer refuses answers
    to questions that are not in its questions file, rightly)."""
    path = os.path.join(out_dir, "pope_scored_answers", f"{split}.jsonl")
    if not elsewhere:
        if os.path.exists(path):  # left by an earlier, smaller run: it is not what this run scored
            os.remove(path)
        return out_path
    _write_jsonl(path, [predictions[it.key] for it in items if it.key in predictions])
    log.info("POPE %s: %d answers stored in %s are to questions this run does not ask (kept there, not scored); "
             "scoring the %d asked, copied to %s", split, elsewhere, out_path, len(predictions), path)
    return path


def _write_answered_questions(questions: list[dict], unanswered: list[dict], source: str, out_dir: str,
                              split: str) -> str:
    """The questions of `source` minus the unanswered ones, as {out_dir}/pope_scored_questions/{split}.jsonl
    (the file stem is the split name the scorer reports)."""
    left_out = {str(q["question_id"]) for q in unanswered}
    path = os.path.join(out_dir, "pope_scored_questions", f"{split}.jsonl")
    _write_jsonl(path, [q for q in questions if str(q["question_id"]) not in left_out])
    log.warning("POPE %s: %d of %d questions have no answer (unreadable image, skipped); scoring %s instead of %s",
                split, len(unanswered), len(questions), path, source)
    return path


def chair_image_list(settings: EvalSettings, run: Optional[ProtocolRun] = None) -> list[str]:
    """Image names for CHAIR under `run`: from a list file (the protocol's shipped one, or eval.chair.images), a
    caption JSON, or a seeded sample of image_dir; at most the protocol's (or eval.chair.num_images) many. Every
    entry must name a COCO image (CHAIR_ENTRY_FORMS) and no image twice: DataFileError naming the file and entry."""
    run = task_run(settings, "chair", run)
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


def check_planned_prompt_lengths(model, settings: EvalSettings, planned: dict[str, list[GenerationItem]],
                                 runs: dict[str, ProtocolRun]) -> None:
    """Every prompt of the run, with its visual tokens and the task's max_new_tokens, within the LLM's positions
    (generate.check_prompt_lengths), for every task before the first answer of any."""
    for split in settings.pope.splits if "pope" in runs else []:
        check_prompt_lengths(model, planned[pope_answers_name(split)], runs["pope"].used.max_new_tokens,
                             "eval.pope.max_new_tokens", pope_question_file(settings.pope, split))
    if "chair" in runs:
        check_prompt_lengths(model, planned[CHAIR_CAPTIONS], runs["chair"].used.max_new_tokens,
                             "eval.chair.max_new_tokens", f"CHAIR ({runs['chair'].label})")


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
    asked = {it.extra["image_id"] for it in items}  # the file may also keep captions of images not asked now
    rows = [dict(row, caption=run.caption_for_scoring(row["caption"]))  # the protocol's sentence handling
            for row in chair_scorer.load_captions(out_path, image_id_key="image_id", caption_key="answer")
            if row["image_id"] in asked]
    result = chair_scorer.score_captions(rows, gt, scorer=scorer, n_bootstrap=settings.bootstrap, seed=settings.seed)
    result.update(protocol_result(run))
    result["sentences"] = run.used.sentences
    result["captions_file"] = out_path
    elsewhere = stored_elsewhere(out_path, items)
    result["stored_answers_not_in_this_run"] = elsewhere
    if elsewhere:
        log.info("CHAIR: %d captions stored in %s are of images this run does not ask for (kept there, not scored)",
                 elsewhere, out_path)
    if skipped:  # scored over the captions that exist; the protocol still names the images asked for
        result["skipped"] = {"images": len(skipped), "paths": skipped}
        log.warning("CHAIR: %d of %d images could not be read and have no caption (on_bad_image: skip)",
                    len(skipped), len(items))
    return result
