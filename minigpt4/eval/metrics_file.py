"""One reader for the metrics.json that evaluate.py writes, checked against what it writes.

    data = load_metrics_file("out/eval/adavib/metrics.json")   # DataFileError naming file and key, or the dict

The results table (minigpt4/eval/results_table.py) and the exporter's --metrics read metrics.json files that a user
may have edited, copied from an older version or written by hand. A string where a number belongs ("0.318") or a
list where a mapping belongs would end in a traceback deep inside the formatting, or worse, print a number that
was never measured; so every value a reader uses is checked here first, and a wrong one is a `DataFileError`
whose message reads `file: key: expected ..., got ...`.

What is checked (keys not listed are allowed, so a file from a newer version still reads):
  * top level: a JSON object; "model", "projector", "protocol" non-empty strings; at least one of "chair", "pope";
    "protocols" (optional) a mapping of task -> mapping;
  * "chair": chair_s, chair_i, recall fractions in [0, 1] and mean_length a number >= 0 (all four required);
    the counts n_captions, n_images, ... integers >= 0; image_set_id a hex string; "bootstrap" (below);
  * "pope": either "splits" (a non-empty mapping of split name -> split metrics) with an optional "mean", or the
    metrics of one split at the top level with "split" naming it; each split's accuracy and f1 are required
    fractions, precision, recall and yes_ratio optional fractions, n, tp, fp, tn, fn, n_images integers >= 0;
    n_questions, n_images integers and question_set_id a hex string at the top;
  * "bootstrap" (any metrics block): "ci" a mapping of metric -> [low, high], two finite numbers, low <= high,
    inside [0, 1] for a fraction; "std" numbers >= 0; n_resamples an integer >= 1; level in (0, 1).
Numbers are never booleans (JSON true is not 1); NaN and Infinity are refused by the JSON reader itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

from minigpt4.common.jsonfiles import DataFileError, read_json, write_json

FRACTIONS = frozenset({"chair_s", "chair_i", "recall", "accuracy", "precision", "f1", "yes_ratio"})
CHAIR_REQUIRED = ("chair_s", "chair_i", "recall", "mean_length")
CHAIR_COUNTS = ("n_captions", "n_images", "n_mentions", "n_hallucinated_mentions", "n_hallucinated_captions",
                "n_captions_unknown_image")
POPE_REQUIRED = ("accuracy", "f1")
POPE_OPTIONAL = ("precision", "recall", "yes_ratio")
POPE_COUNTS = ("n", "tp", "fp", "tn", "fn", "n_images")
SET_ID = re.compile(r"^[0-9a-f]{8,64}$")
SET_ID_LENGTH = 8  # hex digits: a table cell's name for an item set, not a security measure


def item_set_id(items: Iterable[object]) -> str:
    """A short name for a set of scored items (CHAIR image ids; POPE split, question id and image): the first 8 hex
    digits of a SHA-256 over the sorted, de-duplicated items, one a line. Equal sets give equal names in any order;
    the results table marks rows of one protocol whose names differ."""
    lines = sorted({str(item) for item in items})
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:SET_ID_LENGTH]


def print_and_write(result: dict, table: str, out: str | None) -> int:
    """A standalone scorer's last step (python -m minigpt4.eval.chair / .pope): its table on stdout and, with --out,
    its result JSON (the per-task result that metrics.json holds); exit status 0."""
    print(table)
    if out:
        write_json(out, result)
    return 0


def describe(value: Any) -> str:
    """A value as a message shows it: its JSON type, and the value itself when short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, (int, float, str)) for v in value):
        return f"the list {json.dumps(value)}"
    kind = "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__
    return f"{kind} ({len(value)} entries)" if isinstance(value, (list, dict)) else kind


class _Checker:
    """Checks values of one file; every failure names the file and the dotted key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, value: Any) -> None:
        raise DataFileError(f"{self.source}: {key}: expected {expected}, got {describe(value)}")

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            self.fail(key, "a JSON object (a mapping)", value)
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string", value)
        return value

    def number(self, value: Any, key: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "a number", value)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(key, f"a number in [{low if low is not None else '-inf'}, "
                           f"{high if high is not None else 'inf'}]", value)
        return value

    def metric(self, value: Any, key: str) -> float:
        name = key.rsplit(".", 1)[-1]
        return self.number(value, key, 0.0, 1.0) if name in FRACTIONS else self.number(value, key, 0.0)

    def count(self, value: Any, key: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"an integer >= {minimum}", value)
        return value

    def set_id(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not SET_ID.match(value):
            self.fail(key, "a lower-case hex identifier (8 to 64 characters)", value)
        return value

    def interval(self, value: Any, key: str, fraction: bool) -> None:
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)):
            self.fail(key, "an interval [low, high] of two numbers", value)
        low, high = value
        if low > high:
            self.fail(key, "an interval [low, high] with low <= high", value)
        if fraction and (low < 0.0 or high > 1.0):
            self.fail(key, "an interval inside [0, 1] (the metric is a fraction)", value)

    def bootstrap(self, value: Any, key: str) -> None:
        block = self.mapping(value, key)
        ci = self.mapping(block.get("ci", {}), f"{key}.ci")
        for name, interval in ci.items():
            self.interval(interval, f"{key}.ci.{name}", fraction=name in FRACTIONS)
        for name, spread in self.mapping(block.get("std", {}), f"{key}.std").items():
            self.number(spread, f"{key}.std.{name}", 0.0)
        if "n_resamples" in block:
            self.count(block["n_resamples"], f"{key}.n_resamples", minimum=1)
        if "level" in block:
            level = self.number(block["level"], f"{key}.level")
            if not 0.0 < level < 1.0:
                self.fail(f"{key}.level", "a number in (0, 1)", level)

    def block(self, data: dict, key: str, required: tuple[str, ...], optional: tuple[str, ...],
              counts: tuple[str, ...]) -> None:
        """A metrics block: required and optional metric values, counts, and its bootstrap."""
        for name in required:
            if name not in data:
                raise DataFileError(f"{self.source}: {key}: has no {name!r} (every {key.split('.')[0]} result "
                                    f"written by evaluate.py has {', '.join(required)})")
        for name in required + optional:
            if name in data:
                self.metric(data[name], f"{key}.{name}")
        for name in counts:
            if name in data:
                self.count(data[name], f"{key}.{name}")
        if "bootstrap" in data:
            self.bootstrap(data["bootstrap"], f"{key}.bootstrap")


def _check_chair(check: _Checker, value: Any) -> None:
    chair = check.mapping(value, "chair")
    check.block(chair, "chair", CHAIR_REQUIRED, (), CHAIR_COUNTS)
    if "image_set_id" in chair:
        check.set_id(chair["image_set_id"], "chair.image_set_id")


def _check_pope(check: _Checker, value: Any) -> None:
    pope = check.mapping(value, "pope")
    for name in ("rule", "end_string", "protocol"):
        if name in pope and not isinstance(pope[name], str):
            check.fail(f"pope.{name}", "a string", pope[name])
    for name in ("n_questions", "n_images"):
        if name in pope:
            check.count(pope[name], f"pope.{name}")
    if "question_set_id" in pope:
        check.set_id(pope["question_set_id"], "pope.question_set_id")
    if "splits" not in pope:
        if "split" in pope:
            check.text(pope["split"], "pope.split")
        check.block(pope, "pope", POPE_REQUIRED, POPE_OPTIONAL, POPE_COUNTS)
        return
    splits = check.mapping(pope["splits"], "pope.splits")
    if not splits:
        check.fail("pope.splits", "at least one split (name -> metrics)", splits)
    for name, split in splits.items():
        key = f"pope.splits.{name}"
        check.block(check.mapping(split, key), key, POPE_REQUIRED, POPE_OPTIONAL, POPE_COUNTS)
        if "question_set_id" in split:
            check.set_id(split["question_set_id"], f"{key}.question_set_id")
    if "mean" in pope:
        check.block(check.mapping(pope["mean"], "pope.mean"), "pope.mean", POPE_REQUIRED, POPE_OPTIONAL, ())


def check_metrics(data: Any, source: str) -> dict:
    """`data` (a parsed metrics.json) if it is what evaluate.py writes; DataFileError naming `source` and the key."""
    check = _Checker(source)
    if not isinstance(data, dict):
        raise DataFileError(f"{source}: expected a JSON object (a metrics.json written by evaluate.py), "
                            f"got {describe(data)}")
    for key in ("model", "projector", "protocol"):
        if key not in data:
            raise DataFileError(f"{source}: has no {key!r}; expected a non-empty string (evaluate.py writes it)")
        check.text(data[key], key)
    if "chair" not in data and "pope" not in data:
        raise DataFileError(f"{source}: has neither a 'chair' nor a 'pope' result")
    if "protocols" in data:
        for task, entry in check.mapping(data["protocols"], "protocols").items():
            check.mapping(entry, f"protocols.{task}")
    if "chair" in data:
        _check_chair(check, data["chair"])
    if "pope" in data:
        _check_pope(check, data["pope"])
    return data


def load_metrics_file(path: str | os.PathLike) -> dict:
    """One metrics.json, read (UTF-8, strict JSON, regular file) and checked; DataFileError naming file and key."""
    return check_metrics(read_json(path), str(path))
