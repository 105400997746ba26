"""The names of what an evaluation writes into eval.output_dir, owned here and imported by every reader and
writer (benchmark_runs, generate, fingerprint, paired_runs). Plain strings: reading results needs neither torch
nor the model code."""
from __future__ import annotations

CHAIR_CAPTIONS = "chair_captions.jsonl"  # CHAIR's answers file
FINGERPRINT_SUFFIX = ".fingerprint.json"  # X.jsonl's fingerprint is X.fingerprint.json (eval/fingerprint.py)
IMAGE_HASH = "image_sha256"  # the field of an item (and its stored answer) holding its image file's SHA-256


def pope_answers_name(split: str) -> str:
    """POPE's answers file of `split`."""
    return f"pope_{split}_answers.jsonl"
