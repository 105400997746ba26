"""The shapes-world AdaVIB experiment: does the VIB projector make the base model hallucinate less?

    python scripts/shapes_experiment.py                    # one seed: 16 min measured on 2 busy CPU cores
    python scripts/shapes_experiment.py --seeds 0 1 2      # three seeds, mean ± std over seeds
    python scripts/shapes_experiment.py --dry-run          # print the plan (every command line), run nothing

Steps, each skipped when its output is already there from the same command (so a rerun resumes):
1. build the two evaluation worlds (data/shapes_world, data/shapes_world_probe) if they are missing (seconds);
2. evaluate the base model (assets/shapes_base) on CHAIR and POPE random/popular/adversarial;
3. for each seed, fine-tune only its projector three ways with train_configs/shapes_adavib.yaml — linear-CE,
   VIB with a fixed β, AdaVIB — on the same data, steps and seed, and evaluate each the same way;
4. the paper's Figure 1: H/log V of every val image's pooled visual tokens for each model
   (scripts/visual_entropy.py), against whether its CHAIR caption hallucinates (minigpt4.eval.entropy_correlation);
5. print and write <out>/results.md and results.json: every metric with its 95 % bootstrap interval over
   images, the paired bootstrap difference of each variant against linear-CE (minigpt4.eval.paired), the rank
   correlation of H/log V with hallucination per model, and <out>/figure1.png (hallucination rate by H/log V bin).

Training and evaluation run as `train.py` / `evaluate.py` subprocesses with the exact command lines a user
would type (printed as they start), so the experiment exercises the same code paths as the 7B recipes. The run
shows where it stands: step k of N, elapsed time and an estimate of what is left after each step, and the running
step's own progress line (its tqdm bar) live; each step's full output is kept in <step folder>.<kind>.log.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from minigpt4.eval import entropy_correlation as fig1  # noqa: E402
from minigpt4.eval.cooccurrence import partner_traps, total, world_pairs  # noqa: E402
from minigpt4.eval.paired import compare_eval_dirs  # noqa: E402
from minigpt4.shapes.world.folder import ensure_shapes_world  # noqa: E402

TRAIN_CONFIG = "train_configs/shapes_adavib.yaml"
EVAL_CONFIG = "eval_configs/shapes_base.yaml"
# Fine-tunes of the base model's projector: name -> (overrides of TRAIN_CONFIG, projector type to evaluate it with).
FINE_TUNES: dict[str, tuple[list[str], str]] = {
    "linear-CE": (["model.mm_projector_type=linear"], "linear"),
    "VIB fixed β": (["model.vib.adaptive=false"], "vib"),
    "AdaVIB": (["model.vib.adaptive=true"], "vib"),
}
# The rows of every table: name -> (the fine-tune it evaluates, None for the base model itself; evaluate.py
# overrides of its own, e.g. another decoding such as ["eval.decoding=vcd"]). A row without a fine-tune has no
# seed and is evaluated once; rows of one fine-tune share its training run and its H/log V.
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "base": (None, []),
    "linear-CE": ("linear-CE", []),
    "VIB fixed β": ("VIB fixed β", []),
    "AdaVIB": ("AdaVIB", []),
    "base + VCD": (None, ["eval.decoding=vcd"]),  # decode-time mitigation (minigpt4/models/contrastive_decoding.py)
    # VCD's control: its sampling and plausibility cut-off without the contrast to the distorted image
    "base + VCD α=0": (None, ["eval.decoding=vcd", "eval.vcd.alpha=0"]),
    "AdaVIB + VCD": ("AdaVIB", ["eval.decoding=vcd"]),
    "base + OPERA": (None, ["eval.decoding=opera"]),  # beam search with OPERA's penalty (minigpt4/models/opera.py)
    "AdaVIB + OPERA": ("AdaVIB", ["eval.decoding=opera"]),
}
BASELINE = "linear-CE"
# Two evaluation worlds with one train split (seed 0, co-occurrence 0.9): label -> (folder, val co-occurrence).
# In-distribution val pairs anchors with partners 90 % of the time, as in training, so it holds only a handful
# of co-occurrence traps; the probe's val never does, so every anchor there is a trap.
WORLDS = {"in-distribution": ("shapes_world", None), "co-occurrence probe": ("shapes_world_probe", 0.0)}
TRAIN_WORLD = "in-distribution"  # fine-tuning reads its train split (the probe's is the same, byte for byte)
WORLD_ARGS: dict = {}  # build_shapes_world arguments beyond its defaults (the evaluation world); tests shrink it
ENTROPY_FILE = "visual_entropy.json"  # scripts/visual_entropy.py's output in each world's Figure-1 step folder
# (column title, metrics.json path, scale)
COLUMNS = (("CHAIR_S", ("chair", "chair_s"), 100), ("CHAIR_I", ("chair", "chair_i"), 100),
           ("recall", ("chair", "recall"), 100), ("words", ("chair", "mean_length"), 1),
           ("POPE rnd acc", ("pope", "splits", "random", "accuracy"), 100),
           ("POPE pop acc", ("pope", "splits", "popular", "accuracy"), 100),
           ("POPE adv acc", ("pope", "splits", "adversarial", "accuracy"), 100),
           ("POPE F1", ("pope", "mean", "f1"), 100), ("yes %", ("pope", "mean", "yes_ratio"), 100))
# Without a terminal (a log file, CI) the child's progress line is printed at most this often, in seconds.
PLAIN_EVERY_S = 20.0
DIFF_METRICS = ("chair_s", "chair_i", "recall", "pope random accuracy", "pope popular accuracy",
                "pope adversarial accuracy")


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace(" ", "_").replace("β", "beta").replace("-", "_")


def world_options(world: Path) -> list[str]:
    """evaluate.py overrides pointing EVAL_CONFIG at another world folder."""
    return [f"eval.image_dir={world}/images", f"eval.pope.dir={world}/pope",
            f"eval.chair.images={world}/val_images.json", f"eval.chair.coco_annotations={world}/annotations",
            f"eval.chair.synonyms={world}/synonyms.txt"]


class Step(NamedTuple):  # a NamedTuple, not a dataclass: tests load this script without registering it
    """One train.py / evaluate.py command, its output folder and the file that marks it finished."""

    label: str  # the group it belongs to, printed once: "base model", "seed 0, AdaVIB"
    kind: str  # "train" | "eval": steps of one kind take about as long as each other
    command: list[str]
    out_dir: Path
    done_file: str

    @property
    def log_path(self) -> Path:
        return self.out_dir.parent / f"{self.out_dir.name}.{self.kind}.log"

    def reusable(self) -> bool:
        """Finished before by the same command line (a rerun with other options starts the step afresh)."""
        stamp = self.out_dir / "command.json"
        return ((self.out_dir / self.done_file).is_file() and stamp.is_file()
                and json.loads(stamp.read_text()) == self.command)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """Where the whole run stands: step k of N, the time since the start, and an estimate of what is left (the
    steps still to run, each taking the mean time of the steps of its kind run so far)."""

    def __init__(self, steps: list[Step], stream=None):
        self.steps, self.stream = steps, stream or sys.stdout
        self.start = time.perf_counter()
        self.durations: dict[str, list[float]] = {}
        self.to_run = [not step.reusable() for step in steps]

    def say(self, index: int, text: str) -> None:
        print(f"  [{index + 1}/{len(self.steps)}] {text}", file=self.stream, flush=True)

    def left(self, index: int) -> str:
        """The estimate after step `index` ran: "about M:SS left (n steps)" (a kind not run yet counts at the mean
        of all steps so far), or "nothing left"."""
        every = [d for ds in self.durations.values() for d in ds]  # never empty: called after a step ran
        remaining = [s.kind for s, run in zip(self.steps[index + 1:], self.to_run[index + 1:]) if run]
        if not remaining:
            return "nothing left"
        mean = {kind: sum(ds) / len(ds) for kind, ds in self.durations.items()}
        estimate = sum(mean.get(kind, sum(every) / len(every)) for kind in remaining)
        return f"about {_clock(estimate)} left ({len(remaining)} step{'s' if len(remaining) > 1 else ''})"

    def done(self, index: int, seconds: float) -> None:
        step = self.steps[index]
        self.durations.setdefault(step.kind, []).append(seconds)
        self.say(index, f"done   {step.kind} in {seconds:.0f} s · elapsed {_clock(time.perf_counter() - self.start)}"
                        f" · {self.left(index)}")


class LiveLine:
    """The child's latest output line (a tqdm bar or a log line) beside the step. On a terminal it is redrawn
    in place; otherwise (a log file, CI) it is printed as a line at most every PLAIN_EVERY_S seconds."""

    def __init__(self, prefix: str, stream=None):
        self.prefix, self.stream = prefix, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_shown, self.shown = 0.0, ""

    def show(self, text: str) -> None:
        text = text.strip()
        now = time.perf_counter()
        if not text or text == self.shown or now - self.last_shown < (0.2 if self.tty else PLAIN_EVERY_S):
            return
        self.last_shown, self.shown = now, text
        if self.tty:
            width = shutil.get_terminal_size().columns - len(self.prefix) - 1
            self.stream.write("\r\x1b[K" + self.prefix + text[:max(width, 10)])
            self.stream.flush()
        else:
            print(self.prefix + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def stream_child(command: list[str], log_path: Path, line: LiveLine) -> int:
    """Run `command`, every byte of its output into `log_path`, its latest line to `line` as it comes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the child's prints arrive when made, not at exit
    with open(log_path, "wb") as log, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, env=env) as proc:
        pending = b""
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            *complete, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws with \r
            latest = next((c for c in reversed([*complete, pending]) if c.strip()), b"")
            line.show(latest.decode("utf-8", errors="replace"))
        line.close()
        return proc.wait()


def run_step(step: Step, index: int, progress: Progress) -> None:
    """Run `step` unless it is reusable; its full output goes to its log file, its progress line to the screen."""
    if step.reusable():
        progress.say(index, f"reuse  {step.out_dir}")
        return
    if step.out_dir.exists():
        shutil.rmtree(step.out_dir)
    step.out_dir.mkdir(parents=True)
    (step.out_dir / "command.json").write_text(json.dumps(step.command))
    progress.say(index, "run    " + shlex.join(step.command))
    progress.say(index, f"log    {step.log_path}")
    started = time.perf_counter()
    returncode = stream_child(step.command, step.log_path, LiveLine(f"  [{index + 1}/{len(progress.steps)}]   │ "))
    if returncode != 0 or not (step.out_dir / step.done_file).is_file():
        tail = step.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"step failed (exit {returncode}); last lines of {step.log_path}:\n" + "\n".join(tail))
    progress.done(index, time.perf_counter() - started)


def train_step(python: str, out_dir: Path, seed: int, fine_tune: str, extra: list[str]) -> Step:
    overrides = FINE_TUNES[fine_tune][0] + [f"run.seed={seed}", f"run.output_dir={out_dir}"] + extra
    command = [python, "train.py", "--cfg-path", TRAIN_CONFIG, "--options", *overrides]
    return Step(f"seed {seed}, {fine_tune}", "train", command, out_dir, "final/trainable.safetensors")


def eval_step(python: str, out_dir: Path, label: str, name: str, world: Path, options: list[str]) -> Step:
    overrides = [f"eval.output_dir={out_dir}", f"eval.name={name}", *world_options(world), *options]
    command = [python, "evaluate.py", "--cfg-path", EVAL_CONFIG, "--options", *overrides]
    return Step(label, "eval", command, out_dir, "metrics.json")


def entropy_step(python: str, out_dir: Path, world: Path, models: dict[str, list[str]], options: list[str]) -> Step:
    """H/log V of every CHAIR image of `world` for each model ({name: its model.* overrides})."""
    command = [python, "scripts/visual_entropy.py", "--cfg-path", EVAL_CONFIG, "--out", str(out_dir / ENTROPY_FILE)]
    for name, overrides in models.items():
        command += ["--model", name, *overrides]
    command += ["--options", *world_options(world), *options]
    return Step("Figure 1: H/log V of the visual tokens", "entropy", command, out_dir, ENTROPY_FILE)


class Evaluation(NamedTuple):
    """One evaluate.py run of the plan: which table row, world and seed it fills, and the model it evaluates."""

    world: str  # WORLDS label
    row: str  # VARIANTS name
    seed: int | None  # None: the seed-free base model
    model: str  # the model's name in the H/log V files: "base", "seed 0, AdaVIB"
    eval_dir: Path


def plan(args: argparse.Namespace, python: str, worlds: dict[str, Path]) -> tuple[list[Step], list[Evaluation]]:
    """Every step of the run in order (per model: its training, then its evaluations on every world; then
    one H/log V step per world) and the evaluations they make."""
    out = Path(args.out)
    train_options = [f"datasets.shapes_qa.root={Path(args.data) / WORLDS[TRAIN_WORLD][0]}", *args.train_options]
    steps: list[Step] = []
    evaluations: list[Evaluation] = []
    models: dict[str, list[str]] = {}  # name in the H/log V files -> its model.* overrides of EVAL_CONFIG

    def evaluate_rows(fine_tune: str | None, seed: int | None, run_dir: Path, model_options: list[str]) -> None:
        model = "base" if fine_tune is None else f"seed {seed}, {fine_tune}"
        models[model] = model_options
        for row in (r for r in args.variants if VARIANTS[r][0] == fine_tune):
            label = ("base model" if row == "base" else row) if seed is None else f"seed {seed}, {row}"
            for world_label, world in worlds.items():
                folder = f"eval_{slug(world_label)}" if row == (fine_tune or "base") else \
                    f"eval_{slug(row)}_{slug(world_label)}"
                options = [*model_options, *args.eval_options, *VARIANTS[row][1]]
                steps.append(eval_step(python, run_dir / folder, label, row, world, options))
                evaluations.append(Evaluation(world_label, row, seed, model, run_dir / folder))

    evaluate_rows(None, None, out / "base", [])
    needed = [f for f in FINE_TUNES if any(VARIANTS[r][0] == f for r in args.variants)]
    for seed in args.seeds:
        for fine_tune in needed:
            run_dir = out / f"seed{seed}" / slug(fine_tune)
            steps.append(train_step(python, run_dir, seed, fine_tune, train_options))
            evaluate_rows(fine_tune, seed, run_dir, [f"model.mm_projector_type={FINE_TUNES[fine_tune][1]}",
                                                     f"model.ckpt={run_dir / 'final' / 'trainable.safetensors'}"])
    for world_label, world in worlds.items():
        steps.append(entropy_step(python, out / f"visual_entropy_{slug(world_label)}", world, models,
                                  args.eval_options))
    return steps, evaluations


def run_plan(steps: list[Step]) -> None:
    progress = Progress(steps)
    print(f"plan: {len(steps)} steps ({sum(progress.to_run)} to run, {len(steps) - sum(progress.to_run)} "
          "finished before and reused); full logs next to each step's output folder", flush=True)
    for index, step in enumerate(steps):
        if index == 0 or step.label != steps[index - 1].label:
            print(step.label, flush=True)
        run_step(step, index, progress)
    print(f"all {len(steps)} steps done in {_clock(time.perf_counter() - progress.start)}", flush=True)


def ensure_world(world: Path, val_cooccurrence: float | None) -> None:
    ensure_shapes_world(world, val_cooccurrence, WORLD_ARGS)  # reused only if it is exactly this world


def _value(metrics: dict, path: tuple[str, ...]) -> tuple[float | None, list[float] | None]:
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


def _metric_cell(values: list[tuple[float | None, list[float] | None]], scale: float) -> str:
    """One seed: the value with its interval; several: mean ± std over seeds; "–" where any run lacks it."""
    if any(value is None for value, _ in values):
        return "–"
    if len(values) == 1:
        value, ci = values[0]
        return f"{scale * value:.1f}" + (f" [{scale * ci[0]:.1f}, {scale * ci[1]:.1f}]" if ci else "")
    points = np.array([v for v, _ in values]) * scale
    return f"{points.mean():.1f} ± {points.std(ddof=1):.1f}"


def _diff_cell(runs: list[dict], metric: str) -> str:
    if any(metric not in run for run in runs):
        return "–"
    if len(runs) == 1:
        d = runs[0][metric]
        return f"{100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
    points = 100 * np.array([run[metric]["diff"] for run in runs])
    return f"{points.mean():+.1f} ± {points.std(ddof=1):.1f}"


def results_tables(metrics: dict[str, list[dict]], diffs: dict[str, list[dict]],
                   traps: dict[str, list[dict]]) -> str:
    """Markdown: the metrics table (CI or mean ± std over seeds) and the paired differences to BASELINE. Rows may
    come from evaluations with other options (another decoding): each row is read from its own metrics."""
    lines = ["| model | " + " | ".join(title for title, _, _ in COLUMNS) + " | partner named | partner: yes |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, runs in metrics.items():
        cells = [_metric_cell([_value(run, path) for run in runs], scale) for _, path, scale in COLUMNS]
        for hits, of in (("caption_named", "caption_traps"), ("pope_yes", "pope_questions")):
            counts = [t[hits] for t in traps[name]]
            mean = f"{np.mean(counts):.1f}" if len(counts) > 1 else str(counts[0])
            cells.append(f"{mean}/{traps[name][0][of]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "partner named: captions naming the absent partner of a present anchor / such traps; "
              "partner: yes: POPE \"yes\" to such a partner / questions about one.", "", "",
              f"Paired difference to {BASELINE} (percentage points; negative CHAIR = less hallucination):", "",
              "| model | " + " | ".join(DIFF_METRICS) + " |", "|---|" + "---|" * len(DIFF_METRICS)]
    for name, runs in diffs.items():
        lines.append(f"| {name} | " + " | ".join(_diff_cell(runs, metric) for metric in DIFF_METRICS) + " |")
    own = {name: VARIANTS[name][1] for name in metrics if VARIANTS[name][1]}
    if own:
        lines += ["", "Rows evaluated with options of their own: "
                  + "; ".join(f"{name}: {' '.join(options)}" for name, options in own.items()) + "."]
    return "\n".join(lines) + "\n"


def figure1(evaluations: list[Evaluation], entropy_path: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
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


def world_report(label: str, world: Path, evaluations: list[Evaluation], entropy_path: Path,
                 seeds: list[int]) -> tuple[str, dict, dict]:
    """One world's part of results.md, of results.json, and its Figure-1 bins per row (for the plot)."""
    by_row: dict[str, list[Path]] = {}
    for ev in evaluations:
        by_row.setdefault(ev.row, []).append(ev.eval_dir)
    metrics = {name: [json.loads((d / "metrics.json").read_text()) for d in dirs] for name, dirs in by_row.items()}
    # Each seed's rows against that seed's linear-CE; a seed-free row (the base model) against every one. A VCD or
    # OPERA row differs from linear-CE's greedy evaluation in its decoding, which is what the row is named for; any
    # other difference of protocol or items is refused (minigpt4/eval/paired_runs.py).
    diffs = {name: [compare_eval_dirs(a, b, allow_different_decoding=True) for a, b in
                    zip(by_row[BASELINE], dirs * len(seeds) if VARIANTS[name][0] is None else dirs, strict=True)]
             for name, dirs in by_row.items() if name != BASELINE}
    pairs = world_pairs(world)
    traps = {name: [total(partner_traps(d, pairs)) for d in dirs] for name, dirs in by_row.items()}
    correlation, bins = figure1(evaluations, entropy_path)
    vocab = next(iter(correlation.values()))[0]["vocab_size"]
    text = (f"## {label} val ({world})\n\n" + results_tables(metrics, diffs, traps)
            + f"\nFigure 1 on this world: H/log V of each val image's pooled visual tokens (V = {vocab}) against "
            "whether its caption hallucinates (CHAIR: any object not in the image); brackets: 95 % bootstrap "
            "interval over images; AUC: P(H/log V of a hallucinating caption > that of a clean one).\n\n"
            + fig1.figure1_table(correlation))
    summary = {"world": str(world), "traps": traps, "paired_differences_to_" + slug(BASELINE): diffs,
               "metrics_files": {name: [str(d / "metrics.json") for d in dirs] for name, dirs in by_row.items()},
               "figure1": {"entropy_file": str(entropy_path), "by_model": correlation, "bins_seeds_pooled": bins}}
    return text, summary, bins


def report(args: argparse.Namespace, worlds: dict[str, Path], evaluations: list[Evaluation]) -> str:
    """Write results.md, results.json and figure1.png; returns the Markdown."""
    out = Path(args.out)
    seeds_text = (f"seed {args.seeds[0]}; brackets: 95 % bootstrap interval over images" if len(args.seeds) == 1
                  else f"mean ± std over seeds {args.seeds} (the base model has no seed: its bootstrap interval)")
    parts = [f"# Shapes-world experiment\n\n{seeds_text}; fine-tuning overrides: "
             f"{' '.join(args.train_options) or 'none'}; evaluation overrides: "
             f"{' '.join(args.eval_options) or 'none'}.\n"]
    summary: dict = {"seeds": args.seeds, "train_options": args.train_options, "eval_options": args.eval_options,
                     "worlds": {}}
    panels, measurements = {}, []
    for label, world in worlds.items():
        text, summary["worlds"][label], panels[label] = world_report(
            label, world, [ev for ev in evaluations if ev.world == label],
            out / f"visual_entropy_{slug(label)}" / ENTROPY_FILE, args.seeds)
        parts.append(text)
        measurements += [r for rs in summary["worlds"][label]["figure1"]["by_model"].values() for r in rs]
    finding = fig1.overall_finding(measurements)
    parts.append("## Figure 1: does the smoothness of the similarity distribution go with hallucination?\n\n"
                 f"{finding}\n\nPlot: {out / 'figure1.png'} (hallucination rate by H/log V bin, equal-count bins, "
                 "seeds pooled).\n")
    summary["figure1_finding"] = finding
    fig1.plot_hallucination_by_bin(panels, out / "figure1.png", "Hallucination rate by H/log V of the visual tokens")
    markdown = "\n".join(parts)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return markdown


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (several: mean ± std)")
    parser.add_argument("--out", default="out/shapes_experiment", help="output folder")
    parser.add_argument("--data", default="data", help="where the two evaluation worlds live (built if missing)")
    parser.add_argument("--train-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"extra overrides of {TRAIN_CONFIG} for every variant, e.g. model.vib.beta=1e-2")
    parser.add_argument("--eval-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"extra overrides of {EVAL_CONFIG} for every evaluation, e.g. eval.batch_size=64")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help=f"table rows (base and {BASELINE} are always there)")
    parser.add_argument("--worlds", nargs="+", default=[slug(w) for w in WORLDS], choices=[slug(w) for w in WORLDS],
                        help=f"evaluation worlds (fine-tuning reads the {TRAIN_WORLD} world's train split, built "
                             "if missing)")
    parser.add_argument("--dry-run", action="store_true", help="print every step's command line; run nothing")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    args.variants = [name for name in VARIANTS if name in {"base", BASELINE, *args.variants}]  # in table order
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if importlib.util.find_spec("matplotlib") is None:  # figure1.png: found missing before the steps, not after
        raise RuntimeError("the Figure-1 plot needs matplotlib: pip install -e '.[demo]'")
    worlds = {label: Path(args.data) / folder for label, (folder, _) in WORLDS.items() if slug(label) in args.worlds}
    steps, evaluations = plan(args, sys.executable, worlds)
    if args.dry_run:
        for index, step in enumerate(steps):
            state = "reuse" if step.reusable() else "run  "
            print(f"  [{index + 1}/{len(steps)}] {state} {step.kind:<7} {step.label} | {shlex.join(step.command)}")
        return 0
    start = time.perf_counter()
    for label, (folder, val_cooccurrence) in WORLDS.items():  # the train world too, evaluated or not
        if label in worlds or label == TRAIN_WORLD:
            ensure_world(Path(args.data) / folder, val_cooccurrence)
    run_plan(steps)
    print("\n" + report(args, worlds, evaluations))
    print(f"written {Path(args.out) / 'results.md'}, results.json and figure1.png in "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
