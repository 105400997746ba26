"""Paired bootstrap of the difference between two models evaluated on the same images.

Two models scored on the same 300 images have correlated errors: most images are easy for both.
Comparing their separate 95 % intervals throws that away and calls many real differences "overlapping".
The paired bootstrap resamples images once and recomputes both models' metrics on the same draw, so
the interval of B − A reflects only how the two disagree. Every CHAIR and POPE metric of one comparison
uses the same draws.

    python -m minigpt4.eval.paired out/eval/linear out/eval/adavib      # B − A for every shared metric

Each argument is an `evaluate.py` output folder: CHAIR is read from chair.json (its per_caption rows),
POPE from pope.json (the question and answer files it names, its rule and end string).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from minigpt4.eval.bootstrap import resample_totals, safe_divide
from minigpt4.eval.chair import parse_image_id
from minigpt4.eval.pope import answered_questions

# Per-image count columns of a CHAIR result, and the metrics made of them.
CHAIR_COLUMNS = ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions", "recalled", "ground_truth")
CHAIR_METRICS = {"chair_s": ("hallucinated_captions", "captions"), "chair_i": ("hallucinated_mentions", "mentions"),
                 "recall": ("recalled", "ground_truth")}


def image_key(raw: object) -> str:
    """One key per image whatever the naming: CHAIR rows carry COCO ids, POPE rows file names."""
    try:
        return str(parse_image_id(raw))
    except ValueError:
        return str(raw)


def chair_counts(chair_result: dict, source: str = "chair.json") -> dict[str, np.ndarray]:
    """{image key: counts in CHAIR_COLUMNS order} from a scored CHAIR result with per_caption rows."""
    rows = chair_result.get("per_caption")
    if not rows:
        raise ValueError(f"{source}: no per_caption rows (score with minigpt4.eval.chair, which writes them)")
    counts: dict[str, np.ndarray] = {}
    for row in rows:
        truth, mentions = set(row["ground_truth"]), row["mentions"]
        hallucinated = row["hallucinated"]
        values = np.array([1, bool(hallucinated), len(mentions), len(hallucinated), len(set(mentions) & truth),
                           len(truth)], dtype=np.float64)
        key = image_key(row["image_id"])
        counts[key] = counts[key] + values if key in counts else values
    return counts


def pope_counts(pope_result: dict) -> dict[str, dict[str, np.ndarray]]:
    """{"pope <split>": {image key: [correct answers, questions]}} of a scored POPE result."""
    counts: dict[str, dict[str, np.ndarray]] = {}
    for split, question, predicted in answered_questions(pope_result):
        per_image = counts.setdefault(f"pope {split}", {})
        key = image_key(question["image"])
        per_image.setdefault(key, np.zeros(2))
        per_image[key] += (float(predicted == question["label"]), 1.0)
    return counts


def load_eval_counts(eval_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{"chair": counts, "pope <split>": counts, ...} of one evaluate.py output folder."""
    eval_dir = Path(eval_dir)
    out: dict[str, dict[str, np.ndarray]] = {}
    chair_path = eval_dir / "chair.json"
    if chair_path.is_file():
        out["chair"] = chair_counts(json.loads(chair_path.read_text(encoding="utf-8")), str(chair_path))
    pope_path = eval_dir / "pope.json"
    if pope_path.is_file():
        out.update(pope_counts(json.loads(pope_path.read_text(encoding="utf-8"))))
    if not out:
        raise FileNotFoundError(f"{eval_dir}: neither chair.json nor pope.json (an evaluate.py output folder?)")
    return out


def _metrics(totals: np.ndarray, layout: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Metric values from column totals [..., n_columns] laid out as `layout` (part name, first column)."""
    metrics: dict[str, np.ndarray] = {}
    accuracies = []
    for part, start in layout:
        if part == "chair":
            for name, (num, den) in CHAIR_METRICS.items():
                metrics[name] = safe_divide(totals[..., start + CHAIR_COLUMNS.index(num)],
                                            totals[..., start + CHAIR_COLUMNS.index(den)])
        else:
            accuracy = safe_divide(totals[..., start], totals[..., start + 1])
            metrics[f"{part} accuracy"] = accuracy
            accuracies.append(accuracy)
    if len(accuracies) > 1:
        metrics["pope mean accuracy"] = sum(accuracies) / len(accuracies)
    return metrics


def paired_difference(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]],
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """{metric: {"a", "b", "diff" (b − a), "ci" [low, high] of the diff}} over the parts both share.

    Both models must have been scored on the same images in each shared part (anything else is not a
    paired comparison, so it is an error naming the part).
    """
    parts = [p for p in a if p in b]
    if not parts:
        raise ValueError(f"no metric in common: {sorted(a)} vs {sorted(b)}")
    images = sorted({key for p in parts for key in a[p]})
    for part in parts:
        if set(a[part]) != set(b[part]):
            only_a, only_b = sorted(set(a[part]) - set(b[part])), sorted(set(b[part]) - set(a[part]))
            raise ValueError(f"{part}: the two results cover different images (only first: {only_a[:5]}, "
                             f"only second: {only_b[:5]}); a paired comparison needs the same images")
    layout, start = [], 0
    for part in parts:
        layout.append((part, start))
        start += len(CHAIR_COLUMNS) if part == "chair" else 2
    rows = np.zeros((len(images), 2 * start))
    index = {key: i for i, key in enumerate(images)}
    for offset, result in ((0, a), (start, b)):
        for part, first in layout:
            for key, values in result[part].items():
                rows[index[key], offset + first: offset + first + len(values)] += values
    point = rows.sum(axis=0)
    draws = resample_totals(rows, images, n_resamples=n_resamples, seed=seed)
    tail = (1.0 - level) / 2.0 * 100.0
    point_a, point_b = _metrics(point[:start], layout), _metrics(point[start:], layout)
    draws_a, draws_b = _metrics(draws[:, :start], layout), _metrics(draws[:, start:], layout)
    out = {}
    for name in point_a:
        low, high = np.percentile(draws_b[name] - draws_a[name], [tail, 100.0 - tail])
        out[name] = {"a": float(point_a[name]), "b": float(point_b[name]),
                     "diff": float(point_b[name] - point_a[name]), "ci": [float(low), float(high)]}
    return out


def compare_eval_dirs(dir_a: str | Path, dir_b: str | Path, n_resamples: int = 1000, seed: int = 0) -> dict:
    return paired_difference(load_eval_counts(dir_a), load_eval_counts(dir_b), n_resamples, seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paired bootstrap of B − A over the images both were scored on")
    parser.add_argument("a", help="evaluate.py output folder of model A (the reference)")
    parser.add_argument("b", help="evaluate.py output folder of model B")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        result = compare_eval_dirs(args.a, args.b, args.resamples, args.seed)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.markdown:
        print("| metric | A | B | B − A | 95 % paired interval |\n|---|---|---|---|---|")
        for name, r in result.items():
            print(f"| {name} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                  f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}] |")
        return 0
    print(f"{'metric':<28}{'A':>8}{'B':>8}{'B − A':>9}   95% paired CI (percentage points)")
    for name, r in result.items():
        print(f"{name:<28}{100 * r['a']:8.1f}{100 * r['b']:8.1f}{100 * r['diff']:+9.1f}   "
              f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
