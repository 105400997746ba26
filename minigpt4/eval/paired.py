"""Paired bootstrap of the difference between two models evaluated on the same items under the same protocol.

Two models scored on the same 300 images have correlated errors: most images are easy for both.
Comparing their separate 95 % intervals throws that away and calls many real differences "overlapping".
The paired bootstrap resamples images once and recomputes both models' metrics on the same draw, so
the interval of B − A reflects only how the two disagree. Every CHAIR and POPE metric of one comparison
uses the same draws.

    python -m minigpt4.eval.paired out/eval/linear out/eval/adavib      # B − A for every shared metric
    python -m minigpt4.eval.paired A B --allow-different-decoding          # B decoded with VCD, A greedy
    python -m minigpt4.eval.paired A B --allow-different-protocol          # any protocol difference, named above

Each argument is an `evaluate.py` output folder: CHAIR is read from chair.json (its per_caption rows),
POPE from pope.json (the question and answer files it names, its rule and end string), the settings from the
answers' fingerprints. Only the same items under the same protocol are paired (minigpt4/eval/paired_runs.py):
other items (fewer questions, other images or pictures, other ground truth) are refused, and so is another
protocol or setting unless a flag allows it, in which case the output's header names every difference.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt4.eval.bootstrap import resample_totals, safe_divide
from minigpt4.eval.paired_runs import (
    CHAIR_COLUMNS,
    NotPairedError,
    chair_counts,
    check_pairable,
    describe_items,
    image_key,
    load_eval_run,
)
from minigpt4.eval.pope import answered_questions

__all__ = ["CHAIR_COLUMNS", "NotPairedError", "PairedComparison", "chair_counts", "compare", "compare_eval_dirs",
           "image_key", "load_eval_counts", "paired_difference", "pope_counts"]

CHAIR_METRICS = {"chair_s": ("hallucinated_captions", "captions"), "chair_i": ("hallucinated_mentions", "mentions"),
                 "recall": ("recalled", "ground_truth")}


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
    return load_eval_run(eval_dir).counts


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


@dataclass
class PairedComparison:
    """B − A per metric, what was paired and the protocol differences a flag allowed (empty: none)."""

    metrics: dict[str, dict]
    items: str
    allowed_differences: list[str] = field(default_factory=list)


def compare(dir_a: str | Path, dir_b: str | Path, n_resamples: int = 1000, seed: int = 0, *,
            allow_different_protocol: bool = False, allow_different_decoding: bool = False) -> PairedComparison:
    """The paired comparison of two evaluate.py output folders; NotPairedError when they cannot be paired."""
    a, b = load_eval_run(dir_a), load_eval_run(dir_b)
    allowed = check_pairable(a, b, allow_protocol=allow_different_protocol, allow_decoding=allow_different_decoding)
    metrics = paired_difference(a.counts, b.counts, n_resamples, seed)
    return PairedComparison(metrics, describe_items(a, [part for part in a.counts if part in b.counts]), allowed)


def compare_eval_dirs(dir_a: str | Path, dir_b: str | Path, n_resamples: int = 1000, seed: int = 0, *,
                      allow_different_protocol: bool = False, allow_different_decoding: bool = False) -> dict:
    """{metric: {"a", "b", "diff", "ci"}} of `compare`."""
    return compare(dir_a, dir_b, n_resamples, seed, allow_different_protocol=allow_different_protocol,
                   allow_different_decoding=allow_different_decoding).metrics


def header_lines(comparison: PairedComparison) -> list[str]:
    """What was paired and, when a flag allowed it, every protocol difference: the numbers' header."""
    lines = [f"paired over: {comparison.items}"]
    if comparison.allowed_differences:
        lines.append("NOT THE SAME PROTOCOL (allowed by a flag): B − A is the difference of model and protocol "
                     "together: " + "; ".join(comparison.allowed_differences))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paired bootstrap of B − A over the items both were scored on")
    parser.add_argument("a", help="evaluate.py output folder of model A (the reference)")
    parser.add_argument("b", help="evaluate.py output folder of model B")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--allow-different-protocol", action="store_true",
                        help="compare runs of different protocols or settings (the header names each difference)")
    parser.add_argument("--allow-different-decoding", action="store_true",
                        help="compare runs that differ only in their decoding: eval.decoding, eval.vcd.*, "
                             "eval.opera.* (e.g. VCD or OPERA against greedy)")
    args = parser.parse_args(argv)
    try:
        comparison = compare(args.a, args.b, args.resamples, args.seed,
                             allow_different_protocol=args.allow_different_protocol,
                             allow_different_decoding=args.allow_different_decoding)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = comparison.metrics
    if args.markdown:
        print("\n".join(header_lines(comparison)) + "\n")
        print("| metric | A | B | B − A | 95 % paired interval |\n|---|---|---|---|---|")
        for name, r in result.items():
            print(f"| {name} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                  f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}] |")
        return 0
    print("\n".join(header_lines(comparison)))
    print(f"{'metric':<28}{'A':>8}{'B':>8}{'B − A':>9}   95% paired CI (percentage points)")
    for name, r in result.items():
        print(f"{name:<28}{100 * r['a']:8.1f}{100 * r['b']:8.1f}{100 * r['diff']:+9.1f}   "
              f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
