"""An evaluation run, step by step, on the plan built before the model (minigpt4/eval/plan.py):

    plan = plan_evaluation(cfg_path, options)   # settings -> each task's protocol run -> its items
    plan = guard_resume(plan, device_type)      # -> each answers file's fingerprint (eval/fingerprint.py)
    model = build_model(plan.cfg.model, ...)
    check_planned_prompt_lengths(model, plan); write_run_records(plan, device)
    results = run_tasks(model, plan)            # generate (batched, sharded, resumable), then score
    write_results(results, plan)                # rank 0: pope.json, chair.json, metrics.json (+ TensorBoard / W&B)

Generation is told what it runs: the protocol run's settings and answer post-processing, its decoding (the model's
own, VCD or OPERA: decodings.generate_answers) and where the images come from (GenerationInputs: pixels, or the
feature cache's encoder outputs). Only the items asked are scored; answers stored for other items (a larger earlier
run) stay in the answers file and are counted in the result as `stored_answers_not_in_this_run`."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from omegaconf import OmegaConf

from minigpt4.common import dist
from minigpt4.common.images import BadImageError
from minigpt4.common.jsonfiles import write_json
from minigpt4.common.provenance import weight_digests, write_provenance
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.answer_files import CHAIR_CAPTIONS, pope_answers_name
from minigpt4.eval.benchmark_runs import ImageLoader
from minigpt4.eval.decodings import Decoding
from minigpt4.eval.eval_logging import log_evaluation
from minigpt4.eval.feature_cache import build_feature_source
from minigpt4.eval.fingerprint import write_fingerprints
from minigpt4.eval.generate import GenerationItem, check_prompt_lengths, generate_all, stored_elsewhere
from minigpt4.eval.labels import projector_label
from minigpt4.eval.plan import EvalPlan
from minigpt4.eval.protocol_runs import ProtocolRun
from minigpt4.eval.settings import EvalSettings, pope_question_file
from minigpt4.eval.settings import files_to_record as benchmark_files
from minigpt4.eval.vcd import ImagePairs
from minigpt4.models.contrastive_decoding import ContrastiveDecoding
from minigpt4.models.loading import files_to_record as weight_files

log = logging.getLogger(__name__)


class GenerationInputs:
    """Where generate_all's images come from: `load_image` gives preprocessed pixels, or with `eval.feature_cache`
    set, the encoder's outputs from the on-disk cache (`image_features` true; each image encoded once, in batches,
    then reused by every question, split, rerun and projector sweep that shares the folder). Under VCD (`decoding`
    a ContrastiveDecoding) each image comes with its distorted copy (vcd.ImagePairs)."""

    def __init__(self, model, settings: EvalSettings, decoding: Optional[Decoding] = None):
        self.loader = ImageLoader(settings)
        self.batch_size = settings.batch_size
        generation_config = getattr(getattr(model, "llm", None), "generation_config", None)
        if generation_config is not None:
            generation_config.use_cache = settings.use_cache
        self.sources = []
        if isinstance(decoding, ContrastiveDecoding):
            pairs = ImagePairs(model, self.loader, decoding, settings.feature_cache, dict(settings.vis_processor))
            self.sources, self.load_image = pairs.sources, pairs
        elif settings.feature_cache is not None:
            source = build_feature_source(model, settings.feature_cache, dict(settings.vis_processor), self.loader)
            self.sources, self.load_image = [source], source
        else:
            self.load_image = self.loader
        self.image_features = bool(self.sources)  # load_image returns encoder outputs, not pixels

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


def check_planned_prompt_lengths(model, plan: EvalPlan) -> None:
    """Every prompt of the run, with its visual tokens and the task's max_new_tokens, within the LLM's positions
    (generate.check_prompt_lengths), for every task before the first answer of any."""
    settings, runs = plan.settings, plan.runs
    for split in settings.pope.splits if "pope" in runs else []:
        check_prompt_lengths(model, plan.items[pope_answers_name(split)], runs["pope"].used.max_new_tokens,
                             "eval.pope.max_new_tokens", pope_question_file(settings.pope, split))
    if "chair" in runs:
        check_prompt_lengths(model, plan.items[CHAIR_CAPTIONS], runs["chair"].used.max_new_tokens,
                             "eval.chair.max_new_tokens", f"CHAIR ({runs['chair'].label})")


def write_run_records(plan: EvalPlan, device) -> None:
    """The output folder, and on rank 0 what made its answers: provenance.json (commit, versions, SHA-256 of the
    weights and benchmark files) and each answers file's fingerprint, before the first answer."""
    os.makedirs(plan.settings.output_dir, exist_ok=True)
    if dist.get_rank() == 0:
        config = OmegaConf.to_container(plan.cfg, resolve=True)
        write_provenance(config, plan.settings.output_dir, weight_paths=weight_files(config["model"]),
                         data_paths=benchmark_files(plan.settings), device=device)
        write_fingerprints(plan.settings.output_dir, plan.fingerprints)


def run_tasks(model, plan: EvalPlan) -> dict:
    """Every task of the plan, generated and scored into eval.output_dir; the results (empty task results on
    ranks other than 0)."""
    settings = plan.settings
    results = {"model": settings.name, "projector": projector_label(plan.cfg.model)}
    if "pope" in settings.tasks:
        results["pope"] = run_pope(model, plan, settings.output_dir)
    if "chair" in settings.tasks:
        results["chair"] = run_chair(model, plan, settings.output_dir)
    return results


def protocol_result(run: ProtocolRun) -> dict:
    """The protocol fields of a task's result: label, name, source and the overridden keys."""
    result = {"protocol": run.label, "protocol_name": run.named.name, "protocol_source": run.named.source,
              "decoding": run.decoding_name}
    if run.overrides:
        result["protocol_overrides"] = run.overrides
    return result


def run_pope(model, plan: EvalPlan, out_dir: str) -> dict:
    """POPE's planned questions of every split, answered into `out_dir` and scored. With on_bad_image=skip,
    questions whose image could not be read get no answer; they are left out of the scores (a copy of the questions
    file without them is scored) and counted under "skipped"."""
    settings, run = plan.settings, plan.runs["pope"]
    inputs = GenerationInputs(model, settings, run.decoding)
    question_files, answer_files, skipped, elsewhere = [], [], {}, {}
    for split in settings.pope.splits:
        q_path, items = pope_question_file(settings.pope, split), plan.items[pope_answers_name(split)]
        out_path = os.path.join(out_dir, pope_answers_name(split))
        inputs.prepare(items)
        predictions = generate_all(
            model, items, out_path=out_path, load_image=inputs.load_image, image_features=inputs.image_features,
            decoding=run.decoding, generate_kwargs=run.generate_kwargs(), clean_answer=run.clean_answer,
            batch_size=settings.batch_size, sort_by_length=settings.sort_by_length, desc=f"POPE {split}")
        if dist.get_rank() != 0:
            continue
        unanswered = [it for it in items if it.key not in predictions]  # one item per question, in file order
        if unanswered:
            if len(unanswered) == len(items):
                raise BadImageError(settings.image_dir, f"POPE {split}: no image could be read (see the warnings)")
            skipped[split] = {"questions": len(unanswered),
                              "images": sorted({str(it.extra["image"]) for it in unanswered})}
            q_path = _write_answered_questions(q_path, {it.key for it in unanswered}, out_dir, split)
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


def _write_answered_questions(source: str, left_out: set[str], out_dir: str, split: str) -> str:
    """The questions of `source` but those of `left_out` (question ids), as
    {out_dir}/pope_scored_questions/{split}.jsonl (the file stem is the split name the scorer reports)."""
    questions = pope_scorer.load_questions(source, require_text=True)
    path = os.path.join(out_dir, "pope_scored_questions", f"{split}.jsonl")
    _write_jsonl(path, [q for q in questions if str(q["question_id"]) not in left_out])
    log.warning("POPE %s: %d of %d questions have no answer (unreadable image, skipped); scoring %s instead of %s",
                split, len(left_out), len(questions), path, source)
    return path


def run_chair(model, plan: EvalPlan, out_dir: str) -> dict:
    """CHAIR's planned images captioned into `out_dir` and scored; an unreadable image (on_bad_image=skip) has no
    caption and is counted under "skipped"."""
    settings, run, items = plan.settings, plan.runs["chair"], plan.items[CHAIR_CAPTIONS]
    inputs = GenerationInputs(model, settings, run.decoding)
    out_path = os.path.join(out_dir, CHAIR_CAPTIONS)
    inputs.prepare(items)
    predictions = generate_all(
        model, items, out_path=out_path, load_image=inputs.load_image, image_features=inputs.image_features,
        decoding=run.decoding, generate_kwargs=run.generate_kwargs(), clean_answer=run.clean_answer,
        batch_size=settings.batch_size, sort_by_length=False, desc="CHAIR captions")
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


def write_results(results: dict, plan: EvalPlan) -> None:
    """Rank 0: pope.json / chair.json with their detail, metrics.json (read by scripts/results_table.py) and the
    TensorBoard / W&B views of them."""
    settings, out_dir = plan.settings, plan.settings.output_dir
    results["protocol"] = protocol_label(plan)
    results["protocols"] = {task: run.summary() for task, run in plan.runs.items()}
    results["config"] = OmegaConf.to_container(plan.cfg, resolve=True)
    for task in ("pope", "chair"):
        if task in results:
            write_json(os.path.join(out_dir, f"{task}.json"), results[task])
    summary = {k: v for k, v in results.items() if k != "config"}
    # the weights these numbers describe (SHA-256, file names only): the exporter's --metrics checks them
    summary["weights"] = weight_digests(weight_files(results["config"]["model"]))
    if "chair" in summary:  # per-caption detail stays in chair.json
        summary["chair"] = {k: v for k, v in summary["chair"].items() if k != "per_caption"}
    write_json(os.path.join(out_dir, "metrics.json"), summary)
    log.info("results in %s", os.path.abspath(os.path.join(out_dir, "metrics.json")))
    if settings.tensorboard or settings.wandb:  # views of the files just written (eval/eval_logging.py)
        log_evaluation(out_dir, results, tensorboard=settings.tensorboard, wandb=settings.wandb,
                       wandb_project=settings.wandb_project, config=results["config"])


def protocol_label(plan: EvalPlan) -> str:
    """The results table's protocol column: each task's protocol label, POPE with its question files."""
    labels = []
    if "pope" in plan.runs:
        pope = plan.settings.pope
        data = pope.version if pope.dir is None else f"dir {pope.dir}"
        labels.append(f"{plan.runs['pope'].label} ({data})")
    if "chair" in plan.runs:
        labels.append(plan.runs["chair"].label)
    return " + ".join(labels)
