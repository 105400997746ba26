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
then POPE accuracy and F1 (percent) for every split found in any file, mean last. A value a file
does not have is shown as "–".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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

    header = ["model", "projector", "protocol", "source"] + [title for title, _, _ in CHAIR_COLUMNS]
    for name in split_names:
        header += [f"POPE {name} acc", f"POPE {name} F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, data in entries:
        cells = [data["model"], data["projector"], data["protocol"], _source_cell(data)]
        cells += [_cell(data.get("chair"), key, scale) for _, key, scale in CHAIR_COLUMNS]
        splits = _pope_splits(data["pope"]) if "pope" in data else {}
        for name in split_names:
            split = splits.get(name)
            cells += [_cell(split, "accuracy", 100.0), _cell(split, "f1", 100.0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
