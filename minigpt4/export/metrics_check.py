"""`--metrics`: the results that go into the model card must be results of the weights being exported.

    metrics = read_metrics(path)                              # the one metrics.json validator (eval/metrics_file.py)
    verify_metrics_weights(path, metrics, export_sources)     # ExportError naming both files when they differ

evaluate.py records in metrics.json ("weights") the SHA-256 of every weight and tokenizer file the model config
named, keyed `model.<key>`. An export of checkpoint B given the metrics.json of checkpoint A would otherwise put
A's CHAIR and POPE into B's card, exit 0. A metrics.json from before that record is checked against the
provenance.json that evaluate.py wrote beside it; one with neither cannot be checked and is refused.

Both sides are compared key by key: every `model.<key>` must name the same content (a file: its SHA-256; a folder:
the SHA-256 of each file in it), so a moved or renamed copy of the same weights matches and a retrained file at the
same path does not. A key that only one side sets is a difference too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from minigpt4.common.jsonfiles import DataFileError, read_json
from minigpt4.eval.metrics_file import load_metrics_file
from minigpt4.export.source import ExportError

PROVENANCE_FILE = "provenance.json"
MAX_NAMED = 3  # differing keys spelled out in the refusal; more are counted


def read_metrics(path: str) -> dict:
    """The metrics.json, checked by the same validator as the results table (DataFileError naming file and key)."""
    if not os.path.isfile(path):
        raise ExportError(f"--metrics: file not found: {path}")
    try:
        return load_metrics_file(path)
    except DataFileError as err:
        raise ExportError(f"--metrics: {err}") from None


def _content(record: Any) -> Any:
    """What identifies a recorded file's bytes: its SHA-256, or a folder's {relative name: SHA-256}; None when the
    record holds no hash (a missing file, a --no-hash record)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("sha256"), str):
        return record["sha256"]
    files = record.get("files")
    if isinstance(files, dict):
        return {name: entry.get("sha256") if isinstance(entry, dict) else entry for name, entry in files.items()}
    return None


def _describe(record: dict | None) -> str:
    if record is None:
        return "not set"
    name = record.get("file") or Path(str(record.get("path", "?"))).name
    content = _content(record)
    if isinstance(content, str):
        return f"{name} (sha256 {content[:12]})"
    if isinstance(content, dict):
        return f"{name} (a folder of {len(content)} files)"
    return f"{name} ({record.get('kind', 'not hashed')})"


def recorded_weights(path: str, metrics: dict) -> tuple[dict, str]:
    """(the weights the metrics were made with, where that record was read)."""
    if "weights" in metrics:
        weights = metrics["weights"]
        if not isinstance(weights, dict) or not all(isinstance(v, dict) for v in weights.values()):
            raise DataFileError(f"{path}: weights: expected a mapping of config key -> file record (as evaluate.py "
                                "writes it)")
        return weights, path
    provenance = Path(path).with_name(PROVENANCE_FILE)
    if provenance.is_file():
        record = read_json(provenance)
        weights = record.get("weights") if isinstance(record, dict) else None
        if isinstance(weights, dict):
            return weights, str(provenance)
    raise ExportError(f"--metrics {path} does not record the weights it was made with (no 'weights' in it, no "
                      f"{PROVENANCE_FILE} beside it), so it cannot be checked against this export; run evaluate.py "
                      "again on that output folder (it reuses the stored answers and writes the record)")


def verify_metrics_weights(path: str, metrics: dict, export_sources: dict[str, dict]) -> str:
    """Refuse (ExportError) unless the metrics were made with the weights of this export; returns where the
    metrics' weight record was read."""
    recorded, where = recorded_weights(path, metrics)
    differing = []
    for key in sorted(set(recorded) | set(export_sources)):
        theirs, ours = recorded.get(key), export_sources.get(key)
        if ours is not None and _content(ours) is None:
            raise ExportError(f"cannot check --metrics {path}: this export's {key} ({_describe(ours)}) has no "
                              "SHA-256 to compare")
        if theirs is None or ours is None or _content(theirs) != _content(ours):
            differing.append(f"{key}: metrics {_describe(theirs)}, export {_describe(ours)}")
    if differing:
        more = f"; and {len(differing) - MAX_NAMED} more" if len(differing) > MAX_NAMED else ""
        recorded_in = "recorded in it" if where == path else f"recorded in {where}"
        raise ExportError(f"--metrics {path} describes other weights than this export ({recorded_in}: "
                          + "; ".join(differing[:MAX_NAMED]) + more + "); give the metrics.json of an evaluation of "
                          "these weights, or export the weights that were evaluated")
    return where
