"""What decides an answer, recorded next to the answers, so that a resume never mixes two models' answers.

    plan = plan_evaluation(cfg_path, options)   # plan.py: settings -> protocol runs -> answers file -> its items
    plan = guard_resume(plan, device_type)      # + plan.fingerprints; before the model is built; refuses
    write_fingerprints(plan.settings.output_dir, plan.fingerprints)   # rank 0, before the first answer

Resume matches items by key. Without more, evaluating into a finished output folder with another checkpoint,
prompt or max_new_tokens returned the old model's answers and metrics with exit 0. So every answers file
`X.jsonl` gets `X.fingerprint.json`, a flat {field: value} record of
  * `model.<weight key>`: the SHA-256 of each weight file or folder the model config names (through provenance's
    HashCache: a multi-GB file is hashed once per change, not once per run), so a moved copy of the same
    weights still matches and a retrained checkpoint at the same path does not;
  * `tokenizer`: a SHA-256 over the tokenizer's files (tokenizer_path, else the LLM / LLaVA folder's tokenizer*,
    special_tokens_map, added_tokens, vocab, merges, ... files);
  * `model.*`: every other model setting, flattened (architecture, projector kind and VIB settings, prompt
    template and end symbol, dtypes, attention kernel, 8-bit, encoder device);
  * `device`: the device type (dtype "auto" and the kernels depend on it);
  * `eval.*`: every eval setting but those in NOT_ANSWER_SETTINGS: the task's protocol, image processor, and any
    setting added later; image_dir as the resolved folder, the feature cache as on / off (its entries are keyed
    by the encoder, processor, dtype and device, all recorded above). The task's protocol is recorded as run
    (protocol_runs.ProtocolRun.fingerprint_fields): the system text, prompt format (with its segment breaks),
    beams, new-token limits, stop strings, question cleaning / suffix / instruction and answer post-processing
    actually used, so a key given on top of a protocol or a changed protocol record is seen. So is the decoding:
    under eval.decoding = vcd or opera, `eval.decoding` and every VCD / OPERA parameter as the task runs it
    (eval.vcd.beta null is recorded as the task's β; OPERA's beams as eval.num_beams), so a VCD or OPERA run never
    resumes a greedy one, nor the reverse.
Per answer, generate.check_done_items also compares the stored prompt, image name and image content (the file's
SHA-256, benchmark_runs.with_image_hashes) with the item now asked: a changed question file, question text or
cleaning, or a picture replaced under the same file name.

Left out because they do not change an answer: batch size, length sorting, the KV cache switch, the number of
ranks, the output folder, the model name and protocol label, on_bad_image, which images or questions are asked
(checked per answer instead), and every scoring setting (POPE rule, bootstrap, seed, CHAIR annotations and
synonyms): scores are recomputed from the answers on every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from minigpt4.common import dist
from minigpt4.common.config import PATH_KEYS
from minigpt4.common.errors import USER_FACING_ERRORS
from minigpt4.common.provenance import HashCache, file_record
from minigpt4.eval.answer_files import CHAIR_CAPTIONS, FINGERPRINT_SUFFIX, pope_answers_name
from minigpt4.eval.generate import GenerationItem, ResumeMismatchError, check_done_items, completed, describe_change
from minigpt4.eval.plan import EvalPlan
from minigpt4.eval.protocol_runs import ProtocolRun
from minigpt4.eval.settings import EvalSettings, OperaSettings, VCDSettings
from minigpt4.models.loading import files_to_record as weight_files_of

FORMAT = 1
SUFFIX = FINGERPRINT_SUFFIX
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece",
                   "chat_template")
MAX_LISTED = 6  # differing fields named in the refusal; the rest are counted
# `eval.` settings that cannot change an answer. Every other one is in the fingerprint, so a setting added later is
# recorded by default: a resume refused by mistake costs a rerun, one allowed by mistake a wrong number. The image
# set (pope.version/dir/splits, chair.images/num_images/sample_seed) is left to the per-answer check: an answer
# stays valid for its question when other questions are added or dropped. image_dir and feature_cache are
# recorded as the resolved folder and on/off.
NOT_ANSWER_SETTINGS = frozenset({
    "tasks", "output_dir", "name", "batch_size", "device", "sort_by_length", "use_cache", "on_bad_image", "bootstrap",
    "seed", "allow_outside_image_dir", "image_dir", "feature_cache",
    "tensorboard", "wandb", "wandb_project",  # where results are mirrored (eval_logging.py), not what is answered
    "pope.version", "pope.dir", "pope.splits", "pope.rule",
    "chair.images", "chair.num_images", "chair.sample_seed", "chair.coco_annotations", "chair.synonyms",
    "chair.sentences"})
# Recorded per task as the run applies them (ProtocolRun.fingerprint_fields): the raw keys would differ from the
# values used (eval.vcd.beta null is a per-task β, eval.opera.threshold null the setting's), and under the
# protocol's own decoding eval.vcd.* / eval.opera.* decide nothing.
RECORDED_BY_THE_RUN = frozenset({"decoding", *(f"vcd.{field.name}" for field in dataclasses.fields(VCDSettings)),
                                 *(f"opera.{field.name}" for field in dataclasses.fields(OperaSettings))})


def fingerprint_path(answers_path: str) -> str:
    stem = answers_path[: -len(".jsonl")] if answers_path.endswith(".jsonl") else answers_path
    return stem + SUFFIX


def _digest(record: Mapping[str, Any], keep=lambda name: True) -> str:
    """"sha256:..." of a file, or over the sorted (name, sha256) lines of a folder's files that `keep` keeps."""
    if record["kind"] == "file":
        return "sha256:" + record["sha256"]
    if record["kind"] == "dir":
        lines = [f"{name}\t{entry['sha256']}" for name, entry in sorted(record["files"].items()) if keep(name)]
        return "sha256:" + hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return "missing"


def _is_tokenizer_file(name: str) -> bool:
    return "/" not in name and name.startswith(TOKENIZER_FILES)


def _flatten(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def weight_fields(model_cfg: Mapping[str, Any], cache: HashCache) -> dict[str, str]:
    """`model.<weight key>` -> content digest, and `tokenizer` -> a digest over the tokenizer's files."""
    records = {key: file_record(path, cache) for key, path in weight_files_of(model_cfg).items()}
    fields = {key: _digest(record) for key, record in records.items() if key != "model.tokenizer_path"}
    if "model.tokenizer_path" in records:
        source = "model.tokenizer_path"
    else:
        source = "model.llava_path" if model_cfg.get("arch") == "llava15" else "model.llm_path"
    record = records.get(source)
    if record is None:
        fields["tokenizer"] = "none"
    elif record["kind"] == "dir" and any(_is_tokenizer_file(name) for name in record["files"]):
        fields["tokenizer"] = _digest(record, _is_tokenizer_file)
    else:  # a single file, or a folder without the usual names: all of it
        fields["tokenizer"] = _digest(record)
    return fields


def answer_fingerprints(model_cfg: Mapping[str, Any], settings: EvalSettings, runs: Mapping[str, ProtocolRun],
                        device_type: str, *, cache_path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Answers file name -> the fingerprint of everything that decides its answers (module docstring); `runs`:
    task -> its protocol run (the plan's)."""
    cache = HashCache(cache_path)
    weights = weight_fields(model_cfg, cache)
    cache.save()
    model = _flatten({k: v for k, v in model_cfg.items() if k not in PATH_KEYS}, "model")  # paths: by content
    flat = {key: value for key, value in _flatten(dataclasses.asdict(settings), "eval").items()
            if key.split(".", 1)[1] not in NOT_ANSWER_SETTINGS | RECORDED_BY_THE_RUN}
    common = {"format": FORMAT, **weights, **model, "device": device_type,
              **{key: value for key, value in flat.items() if not key.startswith(("eval.pope.", "eval.chair."))},
              "eval.image_dir": os.path.realpath(settings.image_dir),
              "eval.feature_cache": "on" if settings.feature_cache is not None else "off"}
    # the protocol as run (its record with the config's keys applied) replaces the raw keys, null = "protocol's"
    task_fields = {task: {**{key: value for key, value in flat.items() if key.startswith(f"eval.{task}.")},
                          **runs[task].fingerprint_fields()} for task in runs}
    per_file: dict[str, dict[str, Any]] = {}
    if "pope" in settings.tasks:
        per_file.update({pope_answers_name(split): task_fields["pope"] for split in settings.pope.splits})
    if "chair" in settings.tasks:
        per_file[CHAIR_CAPTIONS] = task_fields["chair"]
    # through JSON once, so a fresh fingerprint compares equal to one read back from its file
    return {name: json.loads(json.dumps({**common, **fields})) for name, fields in per_file.items()}


def _read_fingerprint(path: str) -> dict[str, Any] | None:
    try:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ResumeMismatchError(f"{path}: cannot read the fingerprint of the answers next to it ({err}); "
                                  "delete the folder to start fresh") from None
    return stored.get("fields") if isinstance(stored, dict) else {}


def _start_fresh(out_dir: str) -> str:
    return f"to start fresh, set another eval.output_dir or delete {out_dir}"


def check_resume(out_dir: str, fingerprints: Mapping[str, dict], planned: Mapping[str, list[GenerationItem]]) -> None:
    """Refuse (ResumeMismatchError) to continue any answers file of `out_dir` whose answers were made with another
    fingerprint, without one, or for other prompts; a file with no answers yet is fresh whatever it records."""
    for name, fingerprint in fingerprints.items():
        path = os.path.join(out_dir, name)
        done = completed(path)
        if not done:
            continue
        stored = _read_fingerprint(fingerprint_path(path))
        if stored is None:
            raise ResumeMismatchError(
                f"{path} holds {len(done)} answers but no {os.path.basename(fingerprint_path(path))} records which "
                f"model and settings made them (an evaluation from before fingerprints?); {_start_fresh(out_dir)}")
        changed = [key for key in sorted(set(stored) | set(fingerprint)) if stored.get(key) != fingerprint.get(key)]
        if changed:
            absent = "(not recorded)"
            listed = "; ".join(f"{key}: {describe_change(stored.get(key, absent), fingerprint.get(key, absent))}"
                               for key in changed[:MAX_LISTED])
            more = f"; and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
            raise ResumeMismatchError(f"{path}: its {len(done)} answers were made with other settings "
                                      f"({listed}{more}); {_start_fresh(out_dir)}")
        check_done_items(done, planned[name], path)


def guard_resume(plan: EvalPlan, device_type: str) -> EvalPlan:
    """Rank 0 fingerprints the plan's answers files and checks the output folder; every rank raises the same
    refusal, so no rank waits at a barrier for one that stopped. Returns the plan with its fingerprints (empty on
    the other ranks)."""
    fingerprints: dict[str, dict] = {}
    problem = None
    if dist.get_rank() == 0:
        model_cfg = OmegaConf.to_container(plan.cfg.model, resolve=True)
        fingerprints = answer_fingerprints(model_cfg, plan.settings, plan.runs, device_type)
        try:
            check_resume(plan.settings.output_dir, fingerprints, plan.items)
        except USER_FACING_ERRORS as err:
            problem = err
    message = dist.all_gather_object(None if problem is None else str(problem))[0]
    if problem is not None:
        raise problem
    if message is not None:
        raise ResumeMismatchError(message)
    return dataclasses.replace(plan, fingerprints=fingerprints)


def write_fingerprints(out_dir: str, fingerprints: Mapping[str, dict]) -> None:
    """Each answers file's fingerprint next to it (atomic), before its first answer is written."""
    for name, fields in fingerprints.items():
        path = fingerprint_path(os.path.join(out_dir, name))
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "answers": name, "fields": fields}, handle, indent=1)
        os.replace(tmp, path)
