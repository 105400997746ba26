"""What a paired comparison reads from two evaluate.py output folders, and the check that they can be paired.

A paired bootstrap says how two models differ on the same items under the same protocol. Two folders that scored
other items (fewer POPE questions per image, another CHAIR image list, other pictures under the same names, other
ground truth) or ran another protocol (an overridden eval.chair.max_new_tokens, another POPE rule, VCD against
greedy) give a "difference" that is not the models': a model compared with itself would show one. So before any
number is computed, `check_pairable` compares, per task both folders scored:

  * the items: CHAIR image ids and each image's ground truth (from chair.json's per_caption rows); POPE question
    ids per split, with each question's image and label (from the question files pope.json names). They must be
    the same sets, item for item; where both answers record their image file's SHA-256 (`image_sha256`), the
    pictures must be the same too, and where either does not, the image folders (the fingerprints' eval.image_dir);
  * the protocol and settings: the named protocol, its decoding, the scoring rule (POPE rule, CHAIR sentence
    handling), every key given on top of the protocol (protocol_overrides; the item-set keys aside, as the items
    are compared themselves), and every eval.* field of the answers' fingerprints (X.fingerprint.json,
    minigpt4/eval/fingerprint.py) except those that belong to the model: its prompt wording and image processor
    as the protocol gives them to its family, the image folder and the feature cache switch.

A difference in the items is always refused (NotPairedError, naming what differs). A difference in the protocol is
refused unless allowed: `allow_decoding` allows only the decoding: eval.decoding, eval.vcd.*, eval.opera.* and the
beams and stop rule OPERA runs with (a decode-time method compared with greedy decoding of the same model),
`allow_protocol` any; the allowed differences are returned, and the table names them in its header.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4.common.jsonfiles import DataFileError, read_json, read_jsonl
from minigpt4.eval.answer_files import CHAIR_CAPTIONS, FINGERPRINT_SUFFIX, IMAGE_HASH
from minigpt4.eval.chair import parse_image_id
from minigpt4.eval.pope import answered_rows

# Per-image count columns of a CHAIR result.
CHAIR_COLUMNS = ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions", "recalled", "ground_truth")
CAPTION_LISTS = ("ground_truth", "mentions", "hallucinated")  # what a per_caption row must hold
# Keys of protocol_overrides that choose the items, which are compared item by item instead.
ITEM_SET_KEYS = frozenset({"eval.chair.images", "eval.chair.num_images", "eval.chair.sample_seed"})
# Fingerprint fields that belong to the model, not the protocol: the protocol's prompt as given to the model's
# family (a change made on top of the protocol is in protocol_overrides), its image processor, where the images
# are read from (compared with the items) and how the encoder's outputs were computed.
MODEL_SIDE = frozenset({"eval.system", "eval.prompt_format", "eval.image_dir", "eval.feature_cache"})
MODEL_SIDE_PREFIXES = ("eval.vis_processor.",)
MODEL_SIDE_SUFFIXES = (".min_new_tokens", ".answer_cut", ".answer_tail")
NOT_RECORDED = "(not recorded: the protocol's own)"
MAX_LISTED = 6


class NotPairedError(ValueError):
    """Two evaluations that cannot be compared item for item under one protocol; the message says what differs."""


@dataclass
class EvalRun:
    """One evaluate.py output folder, as a paired comparison needs it."""

    folder: str
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # part -> image key -> count columns
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> item id -> what the item is
    hashes: dict[str, dict[str, str | None]] = field(default_factory=dict)  # part -> item id -> image SHA-256
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> setting -> value
    image_dirs: dict[str, str | None] = field(default_factory=dict)  # task -> the fingerprint's eval.image_dir


def image_key(raw: object) -> str:
    """One key per image whatever the naming: CHAIR rows carry COCO ids, POPE rows file names."""
    try:
        return str(parse_image_id(raw))
    except ValueError:
        return str(raw)


def chair_counts(chair_result: dict, source: str = "chair.json") -> dict[str, np.ndarray]:
    """{image key: counts in CHAIR_COLUMNS order} from a scored CHAIR result with per_caption rows."""
    rows = chair_result.get("per_caption") if isinstance(chair_result, dict) else None
    if not rows or not isinstance(rows, list):
        raise DataFileError(f"{source}: no per_caption rows (score with minigpt4.eval.chair, which writes them)")
    counts: dict[str, np.ndarray] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(key), list) for key in CAPTION_LISTS) \
                or "image_id" not in row:
            raise DataFileError(f"{source}: per_caption[{index}]: expected an object with image_id and the lists "
                                f"{', '.join(CAPTION_LISTS)} (as minigpt4.eval.chair writes it)")
        truth, mentions = set(row["ground_truth"]), row["mentions"]
        hallucinated = row["hallucinated"]
        values = np.array([1, bool(hallucinated), len(mentions), len(hallucinated), len(set(mentions) & truth),
                           len(truth)], dtype=np.float64)
        key = image_key(row["image_id"])
        counts[key] = counts[key] + values if key in counts else values
    return counts


def _locate(folder: Path):
    """A recorded path, or where it is now when the output folder was moved (the same path inside `folder`)."""
    def locate(path: str) -> str:
        if os.path.exists(path):
            return path
        recorded = Path(path)
        for candidate in (folder / recorded.name, folder / recorded.parent.name / recorded.name):
            if candidate.exists():
                return str(candidate)
        return path  # missing: the reader names it
    return locate


def _fingerprint(folder: Path, answers_name: str) -> dict[str, Any] | None:
    path = folder / (answers_name[: -len(".jsonl")] + FINGERPRINT_SUFFIX)
    if not path.is_file():
        return None
    stored = read_json(path)
    fields = stored.get("fields") if isinstance(stored, dict) else None
    if not isinstance(fields, dict):
        raise DataFileError(f"{path}: expected {{'fields': {{...}}}} (a fingerprint written by evaluate.py)")
    return fields


def _is_model_side(key: str) -> bool:
    return (not key.startswith("eval.") or key in MODEL_SIDE or key.startswith(MODEL_SIDE_PREFIXES)
            or key.endswith(MODEL_SIDE_SUFFIXES))


def _task_settings(task: str, result: dict, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The protocol and settings a task ran under, as {config key: value} (see the module docstring)."""
    settings = {key: value for key, value in (fingerprint or {}).items() if not _is_model_side(key)}
    settings[f"eval.{task}.protocol"] = result.get("protocol_name", result.get("protocol"))
    settings["decoding"] = result.get("decoding", "greedy")
    scoring = ("rule", "eval.pope.rule") if task == "pope" else ("sentences", "eval.chair.sentences")
    settings[scoring[1]] = result.get(scoring[0])
    for key, change in (result.get("protocol_overrides") or {}).items():
        if key not in ITEM_SET_KEYS:
            settings[key] = change.get("used") if isinstance(change, dict) else change
    return settings


def _load_chair(run: EvalRun, folder: Path) -> None:
    path = folder / "chair.json"
    result = read_json(path)
    run.counts["chair"] = chair_counts(result, str(path))
    run.items["chair"] = {image_key(row["image_id"]): tuple(sorted(row["ground_truth"]))
                          for row in result["per_caption"]}
    captions = _locate(folder)(result.get("captions_file", str(folder / CHAIR_CAPTIONS)))
    stored = read_jsonl(captions) if os.path.isfile(captions) else []
    by_image = {image_key(row.get("image_id")): row.get(IMAGE_HASH) for _, row in stored if isinstance(row, dict)}
    run.hashes["chair"] = {key: by_image.get(key) for key in run.items["chair"]}
    fingerprint = _fingerprint(folder, CHAIR_CAPTIONS)
    run.settings["chair"] = _task_settings("chair", result, fingerprint)
    run.image_dirs["chair"] = (fingerprint or {}).get("eval.image_dir")


def _pope_result(path: Path) -> dict:
    """pope.json, checked for what reading its answers back needs."""
    result = read_json(path)
    files = result.get("files") if isinstance(result, dict) else None
    lists = [files.get(kind) for kind in ("questions", "answers")] if isinstance(files, dict) else []
    if (len(lists) != 2 or not all(isinstance(entries, list) and entries and all(
            isinstance(entry, dict) and isinstance(entry.get("path"), str) for entry in entries) for entries in lists)
            or len(lists[0]) != len(lists[1])):
        raise DataFileError(f"{path}: files: expected {{'questions': [{{'path': ...}}], 'answers': [...]}}, one "
                            "answers file per questions file (as minigpt4.eval.pope writes it)")
    for key in ("rule", "end_string"):
        if not isinstance(result.get(key), str):
            raise DataFileError(f"{path}: {key}: expected a string (as minigpt4.eval.pope writes it)")
    return result


def _load_pope(run: EvalRun, folder: Path) -> None:
    result = _pope_result(folder / "pope.json")
    fingerprint = None
    for split, question, row, predicted in answered_rows(result, _locate(folder)):
        part = f"pope {split}"
        if part not in run.items:
            fingerprint = fingerprint or _fingerprint(folder, f"pope_{split}_answers.jsonl")
        qid, key = str(question["question_id"]), image_key(question["image"])
        run.items.setdefault(part, {})[qid] = (key, question["label"])
        run.hashes.setdefault(part, {})[qid] = row.get(IMAGE_HASH)
        per_image = run.counts.setdefault(part, {})
        per_image.setdefault(key, np.zeros(2))
        per_image[key] += (float(predicted == question["label"]), 1.0)
    run.settings["pope"] = _task_settings("pope", result, fingerprint)
    run.image_dirs["pope"] = (fingerprint or {}).get("eval.image_dir")


def load_eval_run(eval_dir: str | Path) -> EvalRun:
    """Counts, items, image hashes and settings of one evaluate.py output folder."""
    folder = Path(eval_dir)
    run = EvalRun(str(folder))
    if (folder / "chair.json").is_file():
        _load_chair(run, folder)
    if (folder / "pope.json").is_file():
        _load_pope(run, folder)
    if not run.counts:
        raise DataFileError(f"{folder}: neither chair.json nor pope.json (an evaluate.py output folder?)")
    return run


def _listed(entries: list[str]) -> str:
    more = f"; and {len(entries) - MAX_LISTED} more" if len(entries) > MAX_LISTED else ""
    return "; ".join(entries[:MAX_LISTED]) + more


def _item_differences(a: EvalRun, b: EvalRun, part: str, task: str) -> list[str]:
    """What differs between the items of `part` in the two runs (empty: the same items, the same pictures)."""
    unit = "image" if part == "chair" else "question_id"
    items_a, items_b = a.items[part], b.items[part]
    only_a, only_b = sorted(set(items_a) - set(items_b)), sorted(set(items_b) - set(items_a))
    if only_a or only_b:
        sides = [f"{len(keys)} only in {side}, e.g. {keys[:3]}" for side, keys in (("A", only_a), ("B", only_b))
                 if keys]
        return [f"{part}: {len(items_a)} vs {len(items_b)} {unit}s scored ({'; '.join(sides)})"]
    what = "ground truth" if part == "chair" else "image / label"
    changed = [key for key in items_a if items_a[key] != items_b[key]]
    if changed:
        key = changed[0]
        return [f"{part}: {len(changed)} {unit}s have another {what}, e.g. {unit} {key}: {items_a[key]} (A) vs "
                f"{items_b[key]} (B)"]
    hashed = [key for key in items_a if a.hashes[part].get(key) and b.hashes[part].get(key)]
    replaced = [key for key in hashed if a.hashes[part][key] != b.hashes[part][key]]
    if replaced:
        return [f"{part}: {len(replaced)} {unit}s were answered about other pictures (the image files' SHA-256 "
                f"differ), e.g. {unit} {replaced[0]}"]
    if len(hashed) < len(items_a) and a.image_dirs.get(task) != b.image_dirs.get(task):
        return [f"{part}: the images were read from {a.image_dirs.get(task) or 'an unrecorded folder'} (A) and "
                f"{b.image_dirs.get(task) or 'an unrecorded folder'} (B), and the answers record no image hashes "
                "to show they are the same pictures"]
    return []


def _setting_differences(a: EvalRun, b: EvalRun, task: str) -> list[tuple[str, str]]:
    """(key, "value (A) vs value (B)") for each protocol setting of `task` that differs."""
    settings_a, settings_b = a.settings[task], b.settings[task]
    out = []
    for key in sorted(set(settings_a) | set(settings_b)):
        value_a, value_b = settings_a.get(key, NOT_RECORDED), settings_b.get(key, NOT_RECORDED)
        if value_a != value_b:
            out.append((key, f"{json.dumps(value_a, ensure_ascii=False)} (A) vs "
                             f"{json.dumps(value_b, ensure_ascii=False)} (B)"))
    return out


def _is_decoding(key: str) -> bool:
    """eval.decoding and its parameters; OPERA also sets the task's beams and runs without a stop string."""
    return (key in ("decoding", "eval.decoding", "eval.num_beams") or key.startswith(("eval.vcd.", "eval.opera."))
            or key.endswith(".stop_at_end_string"))


def check_pairable(a: EvalRun, b: EvalRun, *, allow_protocol: bool = False,
                   allow_decoding: bool = False) -> list[str]:
    """The protocol differences allowed (for the table's header); NotPairedError for any other difference."""
    parts = [part for part in a.counts if part in b.counts]
    if not parts:
        raise NotPairedError(f"no task in common: {sorted(a.counts)} (A) vs {sorted(b.counts)} (B)")
    pope_a = sorted(p for p in a.counts if p.startswith("pope "))
    pope_b = sorted(p for p in b.counts if p.startswith("pope "))
    item_problems = []
    if pope_a and pope_b and pope_a != pope_b:
        item_problems.append(f"POPE splits {[p[5:] for p in pope_a]} (A) vs {[p[5:] for p in pope_b]} (B)")
    for part in parts:
        item_problems += _item_differences(a, b, part, "chair" if part == "chair" else "pope")
    allowed, protocol_problems = [], []
    for task in [t for t in ("chair", "pope") if t in a.settings and t in b.settings]:
        for key, change in _setting_differences(a, b, task):
            if allow_protocol or (allow_decoding and _is_decoding(key)):
                allowed.append(f"{task} {key}: {change}")
            else:
                protocol_problems.append(f"{task} {key}: {change}")
    if item_problems or protocol_problems:
        hint = (" (--allow-different-protocol compares them anyway and says so in the table's header)"
                if protocol_problems and not item_problems else "")
        raise NotPairedError(f"{a.folder} (A) and {b.folder} (B) cannot be paired: "
                             f"{_listed(item_problems + protocol_problems)}; a paired comparison needs the same "
                             f"items under the same protocol and settings{hint}")
    return allowed


def describe_items(run: EvalRun, parts: list[str]) -> str:
    """What was paired, for the table's header: "chair: 300 images; pope random: 2910 questions of 500 images"."""
    described = []
    for part in parts:
        count = len(run.items[part])
        described.append(f"chair: {count} images" if part == "chair" else
                         f"{part}: {count} questions of {len(run.counts[part])} images")
    return "; ".join(described)
