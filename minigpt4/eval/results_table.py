"""Collect evaluation results into one Markdown table.

    python -m minigpt4.eval.results_table out/*/metrics.json [--out table.md]
    adavib-results out/*/metrics.json                      # the same, installed (scripts/results_table.py too)

Each metrics.json holds one evaluated configuration:

    {"model": "minigpt4-7b",            # required, str
     "projector": "vib",                # required, str
     "protocol": "adavib-pope (coco-2023-08) + opera-chair-500",  # required, str: the named protocols
     "protocols": {"pope": {"name", "label", "source", "cite", "overrides"?}, "chair": {...}},  # optional
     "chair": {...},                    # optional: the output of python -m minigpt4.eval.chair
     "pope": {...}}                     # optional: the output of python -m minigpt4.eval.pope

At least one of "chair" and "pope" must be present. From "chair" the table reads chair_s,
chair_i, recall, mean_length and, if present, bootstrap.ci; from "pope" it reads accuracy and f1
per split (the "splits" mapping of a multi-file result, or the single "split" of a one-file
result), plus "mean" when there is one. Each bootstrap.ci entry is [low, high] and is shown as
"± (high - low) / 2".

One row per (model, projector, protocol), in the order the files are given; a repeated triple is
an error. Columns: model, projector, protocol, source (each task's protocol and the source it reproduces,
from "protocols"; minigpt4/eval/protocols.py has the full record), CHAIR_S, CHAIR_I, recall (percent, one
decimal), length (words, one decimal),
CHAIR set (how many images it scored and their identifier, metrics_file.item_set_id: "300 img · 1a2b3c4d"),
POPE set when a file has POPE (questions and images over all splits, and their identifier: "2910 q, 500 img ·
…"), then POPE accuracy and F1 (percent) for every split found in any file, mean last. A value a file
does not have is shown as "–".

Rows of the same named protocol (overrides and decoding aside) that scored different item sets (another count or
identifier) have their set cell marked "≠", and a note under the table names the sets: a 4-image and a 2-image
run of one protocol are not comparable, and the table says so instead of putting them side by side silently.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from minigpt4.common.jsonfiles import write_text_atomic
from minigpt4.eval.metrics_file import load_metrics_file

MISSING = "–"
CHAIR_COLUMNS = (("CHAIR_S", "chair_s", 100.0), ("CHAIR_I", "chair_i", 100.0),
                 ("recall", "recall", 100.0), ("length", "mean_length", 1.0))


def load_metrics(path: str | Path) -> dict:
    """One metrics.json, checked against what evaluate.py writes (minigpt4/eval/metrics_file.py): a wrong type or a
    missing key is a DataFileError naming the file and the key."""
    return load_metrics_file(path)


def _pope_splits(pope: dict) -> dict[str, dict]:
    """{split name: metrics} of a POPE result, "mean" last when present."""
    if "splits" in pope:
        splits = dict(pope["splits"])
        if "mean" in pope:
            splits["mean"] = pope["mean"]
        return splits
    return {pope.get("split", "pope"): pope}


def _cell(metrics: dict | None, key: str, scale: float) -> str:
    if not metrics or key not in metrics:
        return MISSING
    text = f"{scale * metrics[key]:.1f}"
    ci = (metrics.get("bootstrap") or {}).get("ci", {})
    if key in ci:
        low, high = ci[key]
        text += f" ± {scale * (high - low) / 2:.1f}"
    return text


def _source_cell(data: dict) -> str:
    """Each task's protocol name and the repository:file it was read from, e.g. "pope: adavib-pope, from
    jiaqi5598/AdaVIB: pope_eval.py"; "–" for a metrics.json written before named protocols."""
    protocols = data.get("protocols")
    if not isinstance(protocols, dict) or not protocols:
        return MISSING
    parts = [f"{task}: {entry.get('name', '?')}, from {entry.get('cite', entry.get('source', '?'))}"
             for task, entry in protocols.items() if isinstance(entry, dict)]
    return "; ".join(parts).replace("|", "/") or MISSING


def _protocol_name(data: dict, task: str) -> str:
    """The named protocol a task ran (overrides and VCD aside): rows of one name are meant to be compared."""
    entry = (data.get("protocols") or {}).get(task)
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"]
    result = data[task]
    for key in ("protocol_name", "protocol"):
        if isinstance(result.get(key), str):
            return result[key]
    return data["protocol"]


def _item_set(data: dict, task: str) -> tuple[str, str | None]:
    """(how many items, the set's identifier or None) that a task scored: CHAIR images; POPE questions and images."""
    result = data[task]
    if task == "chair":
        return f"{result.get('n_images', '?')} img", result.get("image_set_id")
    questions = result.get("n_questions")
    if questions is None:  # a metrics.json from before the counts: the splits' n
        counts = [split.get("n") for name, split in _pope_splits(result).items() if name != "mean"]
        questions = sum(counts) if counts and None not in counts else "?"
    images = f", {result['n_images']} img" if "n_images" in result else ""
    return f"{questions} q{images}", result.get("question_set_id")


def _differs(sets: list[tuple[str, str | None]]) -> bool:
    """Whether item sets differ as far as they are known (a count, and the identifier where both have one)."""
    counts = {count for count, _ in sets if "?" not in count}
    ids = {set_id for _, set_id in sets if set_id is not None}
    return len(counts) > 1 or len(ids) > 1


def _set_cells(entries: list[tuple[str | Path, dict]], task: str) -> tuple[list[str], list[str]]:
    """Each row's item-set cell for `task` ("–" without that task), marked "≠" where rows of the same named protocol
    scored different sets, and one note per such protocol."""
    groups: dict[str, list[int]] = {}
    for i, (_, data) in enumerate(entries):
        if task in data:
            groups.setdefault(_protocol_name(data, task), []).append(i)
    cells = [MISSING] * len(entries)
    notes = []
    for name, rows in groups.items():
        sets = [_item_set(entries[i][1], task) for i in rows]
        marked = _differs(sets)
        for i, (count, set_id) in zip(rows, sets):
            known = set_id is not None or "?" not in count  # a metrics.json from before the counts has neither
            cells[i] = (f"{count} · {set_id or MISSING}" if known else MISSING) + (" ≠" if marked else "")
        if marked:
            shown = "; ".join(dict.fromkeys(f"{count} · {set_id or MISSING}" for count, set_id in sets))
            notes.append(f"≠ {task.upper()} {name}: these rows scored different {SET_WORDS[task]} ({shown}); their "
                         "numbers are not comparable.")
    return cells, notes


SET_WORDS = {"chair": "image sets", "pope": "question sets"}


def results_table(paths: Sequence[str | Path]) -> str:
    """The Markdown table of the given metrics.json files."""
    entries = [(path, load_metrics(path)) for path in paths]
    seen: dict[tuple[str, str, str], str | Path] = {}
    split_names: list[str] = []
    for path, data in entries:
        key = (data["model"], data["projector"], data["protocol"])
        if key in seen:
            raise ValueError(f"{path}: same model/projector/protocol {key} as {seen[key]}")
        seen[key] = path
        for name in _pope_splits(data["pope"]) if "pope" in data else ():
            if name not in split_names:
                split_names.append(name)
    if "mean" in split_names:  # the mean goes after every split
        split_names.remove("mean")
        split_names.append("mean")
    chair_sets, chair_notes = _set_cells(entries, "chair")
    pope_sets, pope_notes = _set_cells(entries, "pope")

    header = ["model", "projector", "protocol", "source"] + [title for title, _, _ in CHAIR_COLUMNS] + ["CHAIR set"]
    header += ["POPE set"] if split_names else []
    for name in split_names:
        header += [f"POPE {name} acc", f"POPE {name} F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, (_, data) in enumerate(entries):
        cells = [data["model"], data["projector"], data["protocol"], _source_cell(data)]
        cells += [_cell(data.get("chair"), key, scale) for _, key, scale in CHAIR_COLUMNS] + [chair_sets[row]]
        cells += [pope_sets[row]] if split_names else []
        splits = _pope_splits(data["pope"]) if "pope" in data else {}
        for name in split_names:
            split = splits.get(name)
            cells += [_cell(split, "accuracy", 100.0), _cell(split, "f1", 100.0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = chair_notes + pope_notes
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table of metrics.json files")
    parser.add_argument("metrics", nargs="+", help="metrics.json files")
    parser.add_argument("--out", help="write the table here as well as to stdout")
    args = parser.parse_args(argv)
    try:
        table = results_table(args.metrics)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out:
        write_text_atomic(args.out, table)  # a crash never leaves half a table under the name
    return 0


if __name__ == "__main__":
    sys.exit(main())
