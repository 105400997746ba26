"""The shapes-world AdaVIB experiment: does the VIB projector make the base model hallucinate less?

    python scripts/shapes_experiment.py                    # one seed: ~3 min on 2 CPU cores
    python scripts/shapes_experiment.py --seeds 0 1 2      # three seeds, mean ± std over seeds

Steps, each skipped when its output is already there from the same command (so a rerun resumes):
1. build the evaluation world data/shapes_world if it is missing (seconds);
2. evaluate the base model (assets/shapes_base) on CHAIR and POPE random/popular/adversarial;
3. for each seed, fine-tune only its projector three ways with train_configs/shapes_adavib.yaml — linear-CE,
   VIB with a fixed β, AdaVIB — on the same data, steps and seed, and evaluate each the same way;
4. print and write <out>/results.md and results.json: every metric with its 95 % bootstrap interval over
   images, and the paired bootstrap difference of each VIB variant against linear-CE (minigpt4.eval.paired).

Training and evaluation run as `train.py` / `evaluate.py` subprocesses with the exact command lines a user
would type (printed as they start), so the experiment exercises the same code paths as the 7B recipes.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minigpt4.eval.cooccurrence import partner_traps, total, world_pairs  # noqa: E402
from minigpt4.eval.paired import compare_eval_dirs  # noqa: E402

TRAIN_CONFIG = "train_configs/shapes_adavib.yaml"
EVAL_CONFIG = "eval_configs/shapes_base.yaml"
# name -> (training overrides of TRAIN_CONFIG, projector type to evaluate)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "linear-CE": (["model.mm_projector_type=linear"], "linear"),
    "VIB fixed β": (["model.vib.adaptive=false"], "vib"),
    "AdaVIB": (["model.vib.adaptive=true"], "vib"),
}
BASELINE = "linear-CE"
# Two evaluation worlds with one train split (seed 0, co-occurrence 0.9): label -> (folder, val co-occurrence).
# In-distribution val pairs anchors with partners 90 % of the time, as in training, so it holds only a handful
# of co-occurrence traps; the probe's val never does, so every anchor there is a trap.
WORLDS = {"in-distribution": ("shapes_world", None), "co-occurrence probe": ("shapes_world_probe", 0.0)}
WORLD_ARGS: dict = {}  # build_shapes_world arguments beyond its defaults (the evaluation world); tests shrink it
# (column title, metrics.json path, scale)
COLUMNS = (("CHAIR_S", ("chair", "chair_s"), 100), ("CHAIR_I", ("chair", "chair_i"), 100),
           ("recall", ("chair", "recall"), 100), ("words", ("chair", "mean_length"), 1),
           ("POPE rnd acc", ("pope", "splits", "random", "accuracy"), 100),
           ("POPE pop acc", ("pope", "splits", "popular", "accuracy"), 100),
           ("POPE adv acc", ("pope", "splits", "adversarial", "accuracy"), 100),
           ("POPE F1", ("pope", "mean", "f1"), 100), ("yes %", ("pope", "mean", "yes_ratio"), 100))
DIFF_METRICS = ("chair_s", "chair_i", "recall", "pope random accuracy", "pope popular accuracy",
                "pope adversarial accuracy")


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("β", "beta").replace("-", "_")


def world_options(world: Path) -> list[str]:
    """evaluate.py overrides pointing EVAL_CONFIG at another world folder."""
    return [f"eval.image_dir={world}/images", f"eval.pope.dir={world}/pope",
            f"eval.chair.images={world}/val_images.json", f"eval.chair.coco_annotations={world}/annotations",
            f"eval.chair.synonyms={world}/synonyms.txt"]


def run_step(command: list[str], out_dir: Path, done_file: str, log_name: str) -> None:
    """Run `command` unless out_dir/done_file exists from the same command.

    The command line is stored next to the outputs: a rerun with other options starts that step afresh
    instead of resuming (or reusing) a run made with different settings.
    """
    stamp = out_dir / "command.json"
    if (out_dir / done_file).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == command:
        print(f"  reuse  {out_dir}")
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    stamp.write_text(json.dumps(command))
    print("  run    " + shlex.join(command), flush=True)
    log_path = out_dir.parent / f"{out_dir.name}.{log_name}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0 or not (out_dir / done_file).is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"step failed (exit {result.returncode}); last lines of {log_path}:\n" + "\n".join(tail))


def train(python: str, out_dir: Path, seed: int, variant: str, extra: list[str]) -> None:
    overrides = VARIANTS[variant][0] + [f"run.seed={seed}", f"run.output_dir={out_dir}"] + extra
    command = [python, "train.py", "--cfg-path", TRAIN_CONFIG, "--options", *overrides]
    run_step(command, out_dir, "final/trainable.safetensors", "train")


def evaluate(python: str, out_dir: Path, name: str, world: Path, options: list[str]) -> None:
    overrides = [f"eval.output_dir={out_dir}", f"eval.name={name}", *world_options(world), *options]
    command = [python, "evaluate.py", "--cfg-path", EVAL_CONFIG, "--options", *overrides]
    run_step(command, out_dir, "metrics.json", "eval")


def ensure_world(world: Path, val_cooccurrence: float | None) -> None:
    from minigpt4.datasets.shapes_world import build_shapes_world

    meta = world / "meta.json"
    if meta.is_file():  # reuse it only if it is exactly the world this experiment would build
        params = json.loads(meta.read_text())["params"]
        defaults = {name: p.default for name, p in inspect.signature(build_shapes_world).parameters.items()
                    if name in params} | WORLD_ARGS
        wanted = {**defaults, "val_cooccurrence": defaults["cooccurrence"] if val_cooccurrence is None
                  else val_cooccurrence}
        found = {**params, "val_cooccurrence": params.get("val_cooccurrence", params["cooccurrence"])}
        differ = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if differ:
            raise RuntimeError(f"{world} holds another shapes world ({', '.join(f'{k}: {a} instead of {b}' for k, (a, b) in differ.items())}); "
                               "move it away or pass --data")
        return
    start = time.perf_counter()
    build_shapes_world(world, val_cooccurrence=val_cooccurrence, **WORLD_ARGS)
    print(f"built the shapes world in {world} ({time.perf_counter() - start:.1f} s)")


def _value(metrics: dict, path: tuple[str, ...]) -> tuple[float, list[float] | None]:
    node = metrics
    for key in path[:-1]:
        node = node[key]
    ci = (node.get("bootstrap") or {}).get("ci", {}).get(path[-1])
    return node[path[-1]], ci


def results_tables(metrics: dict[str, list[dict]], diffs: dict[str, list[dict]],
                   traps: dict[str, list[dict]]) -> str:
    """Markdown: the metrics table (CI or mean ± std over seeds) and the paired differences to BASELINE."""
    lines = ["| model | " + " | ".join(title for title, _, _ in COLUMNS) + " | partner named | partner: yes |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, runs in metrics.items():
        cells = []
        for _, path, scale in COLUMNS:
            values = [_value(run, path) for run in runs]
            if len(values) == 1:
                value, ci = values[0]
                cells.append(f"{scale * value:.1f}" + (f" [{scale * ci[0]:.1f}, {scale * ci[1]:.1f}]" if ci else ""))
            else:
                points = np.array([v for v, _ in values]) * scale
                cells.append(f"{points.mean():.1f} ± {points.std(ddof=1):.1f}")
        for hits, of in (("caption_named", "caption_traps"), ("pope_yes", "pope_questions")):
            counts = [t[hits] for t in traps[name]]
            mean = f"{np.mean(counts):.1f}" if len(counts) > 1 else str(counts[0])
            cells.append(f"{mean}/{traps[name][0][of]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "partner named: captions naming the absent partner of a present anchor / such traps; "
              "partner: yes: POPE \"yes\" to such a partner / questions about one.", "","", f"Paired difference to {BASELINE} (percentage points; negative CHAIR = less hallucination):", "",
              "| model | " + " | ".join(DIFF_METRICS) + " |", "|---|" + "---|" * len(DIFF_METRICS)]
    for name, runs in diffs.items():
        cells = []
        for metric in DIFF_METRICS:
            if len(runs) == 1:
                d = runs[0][metric]
                cells.append(f"{100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]")
            else:
                points = 100 * np.array([run[metric]["diff"] for run in runs])
                cells.append(f"{points.mean():+.1f} ± {points.std(ddof=1):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (several: mean ± std)")
    parser.add_argument("--out", default="out/shapes_experiment", help="output folder")
    parser.add_argument("--data", default="data", help="where the two evaluation worlds live (built if missing)")
    parser.add_argument("--train-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"extra overrides of {TRAIN_CONFIG} for every variant, e.g. model.vib.beta=1e-2")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)  # the paired differences are taken against it
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out, python = Path(args.out), sys.executable
    worlds = {label: Path(args.data) / folder for label, (folder, _) in WORLDS.items()}
    # Both worlds share their train split; fine-tuning reads the first.
    train_options = [f"datasets.shapes_qa.root={worlds['in-distribution']}", *args.train_options]

    start = time.perf_counter()
    for label, (_, val_cooccurrence) in WORLDS.items():
        ensure_world(worlds[label], val_cooccurrence)
    eval_dirs: dict[str, dict[str, list[Path]]] = {label: {} for label in WORLDS}

    def evaluate_everywhere(name: str, run_dir: Path, options: list[str]) -> None:
        for label, world in worlds.items():
            eval_dir = run_dir / f"eval_{slug(label)}"
            evaluate(python, eval_dir, name, world, options)
            eval_dirs[label].setdefault(name, []).append(eval_dir)

    print("base model")
    evaluate_everywhere("base", out / "base", [])
    for seed in args.seeds:
        for variant in args.variants:
            print(f"seed {seed}, {variant}")
            run_dir = out / f"seed{seed}" / slug(variant)
            train(python, run_dir, seed, variant, train_options)
            evaluate_everywhere(variant, run_dir, [f"model.mm_projector_type={VARIANTS[variant][1]}",
                                                   f"model.ckpt={run_dir / 'final' / 'trainable.safetensors'}"])

    seeds_text = (f"seed {args.seeds[0]}; brackets: 95 % bootstrap interval over images" if len(args.seeds) == 1
                  else f"mean ± std over seeds {args.seeds} (the base model has no seed: its bootstrap interval)")
    parts = [f"# Shapes-world experiment\n\n{seeds_text}; fine-tuning overrides: "
             f"{' '.join(args.train_options) or 'none'}.\n"]
    summary: dict = {"seeds": args.seeds, "train_options": args.train_options, "worlds": {}}
    for label, by_model in eval_dirs.items():
        metrics = {name: [json.loads((d / "metrics.json").read_text()) for d in dirs] for name, dirs in by_model.items()}
        # Each seed's variants against that seed's linear-CE; the seed-free base model against every one.
        diffs = {name: [compare_eval_dirs(a, b) for a, b in
                        zip(by_model[BASELINE], dirs * len(args.seeds) if name == "base" else dirs, strict=True)]
                 for name, dirs in by_model.items() if name != BASELINE}
        pairs = world_pairs(worlds[label])
        traps = {name: [total(partner_traps(d, pairs)) for d in dirs] for name, dirs in by_model.items()}
        parts.append(f"## {label} val ({worlds[label]})\n\n" + results_tables(metrics, diffs, traps))
        summary["worlds"][label] = {
            "world": str(worlds[label]), "traps": traps, "paired_differences_to_" + slug(BASELINE): diffs,
            "metrics_files": {name: [str(d / "metrics.json") for d in dirs] for name, dirs in by_model.items()}}
    report = "\n".join(parts)
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print("\n" + report)
    print(f"written {out / 'results.md'} and results.json in {time.perf_counter() - start:.0f} s")
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
