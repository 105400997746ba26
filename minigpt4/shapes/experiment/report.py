"""The experiment's report: <out>/results.md, results.json and figure1.png from the evaluations of the plan.

Per world: every metric with its 95 % bootstrap interval over images (or mean ± std over seeds), the paired
bootstrap difference of each row against linear-CE (minigpt4.eval.paired), the co-occurrence traps, and the rank
correlation of H/log V with hallucination per model (minigpt4.eval.entropy_correlation, the paper's Figure 1).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from minigpt4.common.jsonfiles import write_json, write_text_atomic
from minigpt4.eval import entropy_correlation as fig1
from minigpt4.eval.cooccurrence import partner_traps, total, world_pairs
from minigpt4.eval.paired import compare_eval_dirs
from minigpt4.shapes.experiment.plan import (
    BACKBONES,
    BASELINE,
    ENTROPY_FILE,
    MATCHED,
    STAMP_FILE,
    VARIANTS,
    Backbones,
    Evaluation,
    slug,
)

# (column title, metrics.json path, scale)
COLUMNS = (
    ("CHAIR_S", ("chair", "chair_s"), 100),
    ("CHAIR_I", ("chair", "chair_i"), 100),
    ("recall", ("chair", "recall"), 100),
    ("words", ("chair", "mean_length"), 1),
    ("POPE rnd acc", ("pope", "splits", "random", "accuracy"), 100),
    ("POPE pop acc", ("pope", "splits", "popular", "accuracy"), 100),
    ("POPE adv acc", ("pope", "splits", "adversarial", "accuracy"), 100),
    ("POPE F1", ("pope", "mean", "f1"), 100),
    ("yes %", ("pope", "mean", "yes_ratio"), 100),
)
DIFF_METRICS = ("chair_s", "chair_i", "recall", "pope random accuracy", "pope popular accuracy",
                "pope adversarial accuracy")
TRAP_COLUMNS = (("caption_named", "caption_traps"), ("pope_yes", "pope_questions"))  # (hits, of)


def metric_value(metrics: dict, path: tuple[str, ...]) -> tuple[float | None, list[float] | None]:
    """A metric and its interval from metrics.json; (None, None) where the run did not measure it (a POPE split
    left out by --eval-options, a task not run)."""
    pope = metrics.get("pope") or {}
    if "split" in pope and "splits" not in pope:  # one split: evaluate.py writes its result flat, the mean is it
        metrics = {**metrics, "pope": {"splits": {pope["split"]: pope}, "mean": pope}}
    node = metrics
    for key in path[:-1]:
        node = node.get(key) or {}
    if path[-1] not in node:
        return None, None
    return node[path[-1]], (node.get("bootstrap") or {}).get("ci", {}).get(path[-1])


def metric_cell(values: list[tuple[float | None, list[float] | None]], scale: float) -> str:
    """One seed: the value with its interval; several: mean ± std over seeds; "–" where any run lacks it."""
    if any(value is None for value, _ in values):
        return "–"
    if len(values) == 1:
        value, ci = values[0]
        interval = f" [{scale * ci[0]:.1f}, {scale * ci[1]:.1f}]" if ci else ""
        return f"{scale * value:.1f}" + interval
    points = np.array([v for v, _ in values]) * scale
    return f"{points.mean():.1f} ± {points.std(ddof=1):.1f}"


def diff_cell(runs: list[dict], metric: str) -> str:
    if any(metric not in run for run in runs):
        return "–"
    if len(runs) == 1:
        d = runs[0][metric]
        return f"{100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
    points = 100 * np.array([run[metric]["diff"] for run in runs])
    return f"{points.mean():+.1f} ± {points.std(ddof=1):.1f}"


def trap_cell(traps: list[dict], hits: str, of: str) -> str:
    counts = [t[hits] for t in traps]
    mean = f"{np.mean(counts):.1f}" if len(counts) > 1 else str(counts[0])
    return f"{mean}/{traps[0][of]}"


def results_tables(metrics: dict[str, list[dict]], diffs: dict[str, list[dict]],
                   traps: dict[str, list[dict]]) -> str:
    """Markdown: the metrics table (CI or mean ± std over seeds) and the paired differences to BASELINE. Rows may
    come from evaluations with other options (another decoding): each row is read from its own metrics."""
    titles = " | ".join(title for title, _, _ in COLUMNS)
    lines = [f"| model | {titles} | partner named | partner: yes |", "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, runs in metrics.items():
        cells = [metric_cell([metric_value(run, path) for run in runs], scale) for _, path, scale in COLUMNS]
        cells += [trap_cell(traps[name], hits, of) for hits, of in TRAP_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "partner named: captions naming the absent partner of a present anchor / such traps; "
        "partner: yes: POPE \"yes\" to such a partner / questions about one.",
        "",
        "",
        f"Paired difference to {BASELINE} (percentage points; negative CHAIR = less hallucination):",
        "",
        "| model | " + " | ".join(DIFF_METRICS) + " |",
        "|---|" + "---|" * len(DIFF_METRICS),
    ]
    for name, runs in diffs.items():
        lines.append(f"| {name} | " + " | ".join(diff_cell(runs, metric) for metric in DIFF_METRICS) + " |")
    own = {name: VARIANTS[name][1] for name in metrics if VARIANTS[name][1]}
    if own:
        listed = "; ".join(f"{name}: {' '.join(options)}" for name, options in own.items())
        lines += ["", f"Rows evaluated with options of their own: {listed}."]
    return "\n".join(lines) + "\n"


def figure1(evaluations: list[Evaluation],
            entropy_path: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per row: the correlation of H/log V with per-caption hallucination for each of its evaluations (one per
    seed), and the hallucination rate by H/log V bin over all of them (seeds pooled, for the plot)."""
    entropy = json.loads(entropy_path.read_text(encoding="utf-8"))
    results: dict[str, list[dict]] = {}
    pooled: dict[str, tuple[list[float], list[bool]]] = {}
    for ev in evaluations:
        result, ratio, flags = fig1.eval_dir_correlation(ev.eval_dir, entropy, ev.model)
        results.setdefault(ev.row, []).append({**result, "seed": ev.seed})  # the training seed (None: base)
        pooled.setdefault(ev.row, ([], []))[0].extend(ratio)
        pooled[ev.row][1].extend(flags)
    return results, {row: fig1.hallucination_by_bin(*data) for row, data in pooled.items()}


def paired_differences(by_row: dict[str, list[Path]], seeds: list[int]) -> dict[str, list[dict]]:
    """Each seed's rows against that seed's linear-CE; a seed-free row (the base model) against every one. A VCD or
    OPERA row differs from linear-CE's greedy evaluation in its decoding, which is what the row is named for; any
    other difference of protocol or items is refused (minigpt4/eval/paired_runs.py)."""
    diffs = {}
    for name, dirs in by_row.items():
        if name == BASELINE:
            continue
        against = dirs * len(seeds) if VARIANTS[name][0] is None else dirs
        diffs[name] = [compare_eval_dirs(a, b, allow_different_decoding=True)
                       for a, b in zip(by_row[BASELINE], against, strict=True)]
    return diffs


def world_report(label: str, world: Path, evaluations: list[Evaluation], entropy_path: Path,
                 seeds: list[int]) -> tuple[str, dict, dict]:
    """One world's part of results.md, of results.json, and its Figure-1 bins per row (for the plot)."""
    by_row: dict[str, list[Path]] = {}
    for ev in evaluations:
        by_row.setdefault(ev.row, []).append(ev.eval_dir)
    metrics = {name: [json.loads((d / "metrics.json").read_text()) for d in dirs] for name, dirs in by_row.items()}
    diffs = paired_differences(by_row, seeds)
    pairs = world_pairs(world)
    traps = {name: [total(partner_traps(d, pairs)) for d in dirs] for name, dirs in by_row.items()}
    correlation, bins = figure1(evaluations, entropy_path)
    vocab = next(iter(correlation.values()))[0]["vocab_size"]
    text = (
        f"## {label} val ({world})\n\n"
        + results_tables(metrics, diffs, traps)
        + f"\nFigure 1 on this world: H/log V of each val image's pooled visual tokens (V = {vocab}) against "
        "whether its caption hallucinates (CHAIR: any object not in the image); brackets: 95 % bootstrap "
        "interval over images; AUC: P(H/log V of a hallucinating caption > that of a clean one).\n\n"
        + fig1.figure1_table(correlation)
    )
    summary = {
        "world": str(world),
        "traps": traps,
        "paired_differences_to_" + slug(BASELINE): diffs,
        "metrics_files": {name: [str(d / "metrics.json") for d in dirs] for name, dirs in by_row.items()},
        "figure1": {"entropy_file": str(entropy_path), "by_model": correlation, "bins_seeds_pooled": bins},
    }
    return text, summary, bins


def backbones_name(backbones: Backbones) -> str:
    return next(name for name, known in BACKBONES.items() if known == backbones)


def matched_beta_text(out: Path, seeds: list[int], variants: list[str]) -> str:
    """The β each seed's matched-β control trained with (its own command line), or nothing without that row."""
    if MATCHED not in variants:
        return ""
    betas = []
    for seed in seeds:
        command = json.loads((out / f"seed{seed}" / slug(MATCHED) / STAMP_FILE).read_text())["command"]
        betas.append(next(part.split("=", 1)[1] for part in command if part.startswith("model.vib.beta=")))
    return (f" {MATCHED}: β = {', '.join(betas)} (seed {', '.join(map(str, seeds))}), the mean effective KL weight "
            "β·Σα·KL/ΣKL of the same seed's AdaVIB run.")


def report(args: argparse.Namespace, worlds: dict[str, Path], evaluations: list[Evaluation],
           header: str | None = None) -> str:
    """Write results.md, results.json and figure1.png; returns the Markdown. `header` (the line of
    minigpt4/common/results_header.py: date, machine, commit) goes under the title."""
    out = Path(args.out)
    if len(args.seeds) == 1:
        seeds_text = f"seed {args.seeds[0]}; brackets: 95 % bootstrap interval over images"
    else:
        seeds_text = f"mean ± std over seeds {args.seeds} (the base model has no seed: its bootstrap interval)"
    backbones = args.backbones
    eval_options = [*backbones.eval_options, *args.eval_options]
    title = "# Shapes-world experiment\n\n" + (f"{header}\n\n" if header else "")
    parts = [f"{title}Backbones: {backbones_name(backbones)} ({backbones.train_config}, {backbones.eval_config}); "
             f"{seeds_text}; fine-tuning overrides: {' '.join(args.train_options) or 'none'}; evaluation "
             f"overrides: {' '.join(eval_options) or 'none'}; POPE questions: "
             f"{'all' if backbones.pope_first is None else f'the first {backbones.pope_first} of each split'}."
             + matched_beta_text(out, args.seeds, args.variants) + "\n"]
    summary: dict = {"backbones": backbones_name(backbones), "seeds": args.seeds, "train_options": args.train_options,
                     "eval_options": eval_options, "pope_first": backbones.pope_first, "worlds": {}}
    panels, measurements = {}, []
    for label, world in worlds.items():
        entropy_path = out / f"visual_entropy_{slug(label)}" / ENTROPY_FILE
        in_world = [ev for ev in evaluations if ev.world == label]
        text, summary["worlds"][label], panels[label] = world_report(label, world, in_world, entropy_path,
                                                                     args.seeds)
        parts.append(text)
        by_model = summary["worlds"][label]["figure1"]["by_model"]
        measurements += [r for rs in by_model.values() for r in rs]
    finding = fig1.overall_finding(measurements)
    parts.append("## Figure 1: does the smoothness of the similarity distribution go with hallucination?\n\n"
                 f"{finding}\n\nPlot: {out / 'figure1.png'} (hallucination rate by H/log V bin, equal-count bins, "
                 "seeds pooled).\n")
    summary["figure1_finding"] = finding
    fig1.plot_hallucination_by_bin(panels, out / "figure1.png", "Hallucination rate by H/log V of the visual tokens")
    markdown = "\n".join(parts)
    write_text_atomic(out / "results.md", markdown)
    write_json(out / "results.json", summary, indent=1)
    return markdown
