"""The plan of the shapes-world experiment (scripts/shapes_experiment.py): which models it trains, which rows each
table has, the two evaluation worlds, and every train.py / evaluate.py / visual_entropy.py command in order.

Each step is the exact command line a user would type, so the experiment runs the same code paths as the 7B
recipes; a step already finished by the same command line is reused (running.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from minigpt4.shapes.world.folder import ensure_shapes_world

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
    # decode-time mitigation (minigpt4/models/contrastive_decoding.py)
    "base + VCD": (None, ["eval.decoding=vcd"]),
    # VCD's control: its sampling and plausibility cut-off without the contrast to the distorted image
    "base + VCD α=0": (None, ["eval.decoding=vcd", "eval.vcd.alpha=0"]),
    "AdaVIB + VCD": ("AdaVIB", ["eval.decoding=vcd"]),
    # beam search with OPERA's penalty (minigpt4/models/opera.py)
    "base + OPERA": (None, ["eval.decoding=opera"]),
    "AdaVIB + OPERA": ("AdaVIB", ["eval.decoding=opera"]),
}
BASELINE = "linear-CE"
# Two evaluation worlds with one train split (seed 0, co-occurrence 0.9): label -> (folder, val co-occurrence).
# In-distribution val pairs anchors with partners 90 % of the time, as in training, so it holds only a handful
# of co-occurrence traps; the probe's val never does, so every anchor there is a trap.
WORLDS = {"in-distribution": ("shapes_world", None), "co-occurrence probe": ("shapes_world_probe", 0.0)}
TRAIN_WORLD = "in-distribution"  # fine-tuning reads its train split (the probe's is the same, byte for byte)
# build_shapes_world arguments beyond its defaults (the evaluation world); tests shrink it
WORLD_ARGS: dict = {}
ENTROPY_FILE = "visual_entropy.json"  # scripts/visual_entropy.py's output in each world's Figure-1 step folder


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace(" ", "_").replace("β", "beta").replace("-", "_")


def world_options(world: Path) -> list[str]:
    """evaluate.py overrides pointing EVAL_CONFIG at another world folder."""
    return [
        f"eval.image_dir={world}/images",
        f"eval.pope.dir={world}/pope",
        f"eval.chair.images={world}/val_images.json",
        f"eval.chair.coco_annotations={world}/annotations",
        f"eval.chair.synonyms={world}/synonyms.txt",
    ]


class Step(NamedTuple):
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
        if not (self.out_dir / self.done_file).is_file() or not stamp.is_file():
            return False
        return json.loads(stamp.read_text()) == self.command


class Evaluation(NamedTuple):
    """One evaluate.py run of the plan: which table row, world and seed it fills, and the model it evaluates."""

    world: str  # WORLDS label
    row: str  # VARIANTS name
    seed: int | None  # None: the seed-free base model
    model: str  # the model's name in the H/log V files: "base", "seed 0, AdaVIB"
    eval_dir: Path


def train_step(python: str, out_dir: Path, seed: int, fine_tune: str, extra: list[str]) -> Step:
    overrides = FINE_TUNES[fine_tune][0] + [f"run.seed={seed}", f"run.output_dir={out_dir}"] + extra
    command = [python, "train.py", "--cfg-path", TRAIN_CONFIG, "--options", *overrides]
    return Step(f"seed {seed}, {fine_tune}", "train", command, out_dir, "final/trainable.safetensors")


def eval_step(python: str, out_dir: Path, label: str, name: str, world: Path, options: list[str]) -> Step:
    overrides = [f"eval.output_dir={out_dir}", f"eval.name={name}", *world_options(world), *options]
    command = [python, "evaluate.py", "--cfg-path", EVAL_CONFIG, "--options", *overrides]
    return Step(label, "eval", command, out_dir, "metrics.json")


def entropy_step(python: str, out_dir: Path, world: Path, models: dict[str, list[str]],
                 options: list[str]) -> Step:
    """H/log V of every CHAIR image of `world` for each model ({name: its model.* overrides})."""
    command = [python, "scripts/visual_entropy.py", "--cfg-path", EVAL_CONFIG, "--out", str(out_dir / ENTROPY_FILE)]
    for name, overrides in models.items():
        command += ["--model", name, *overrides]
    command += ["--options", *world_options(world), *options]
    return Step("Figure 1: H/log V of the visual tokens", "entropy", command, out_dir, ENTROPY_FILE)


def eval_folder(row: str, fine_tune: str | None, world_label: str) -> str:
    """A row's evaluation folder in its model's run folder: the model's own row is named by the world alone."""
    if row == (fine_tune or "base"):
        return f"eval_{slug(world_label)}"
    return f"eval_{slug(row)}_{slug(world_label)}"


def plan(args: argparse.Namespace, python: str, worlds: dict[str, Path]) -> tuple[list[Step], list[Evaluation]]:
    """Every step of the run in order (per model: its training, then its evaluations on every world; then
    one H/log V step per world) and the evaluations they make."""
    out = Path(args.out)
    train_world = Path(args.data) / WORLDS[TRAIN_WORLD][0]
    train_options = [f"datasets.shapes_qa.root={train_world}", *args.train_options]
    steps: list[Step] = []
    evaluations: list[Evaluation] = []
    models: dict[str, list[str]] = {}  # name in the H/log V files -> its model.* overrides of EVAL_CONFIG

    def evaluate_rows(fine_tune: str | None, seed: int | None, run_dir: Path, model_options: list[str]) -> None:
        model = "base" if fine_tune is None else f"seed {seed}, {fine_tune}"
        models[model] = model_options
        for row in (r for r in args.variants if VARIANTS[r][0] == fine_tune):
            if seed is None:
                label = "base model" if row == "base" else row
            else:
                label = f"seed {seed}, {row}"
            for world_label, world in worlds.items():
                folder = eval_folder(row, fine_tune, world_label)
                options = [*model_options, *args.eval_options, *VARIANTS[row][1]]
                steps.append(eval_step(python, run_dir / folder, label, row, world, options))
                evaluations.append(Evaluation(world_label, row, seed, model, run_dir / folder))

    evaluate_rows(None, None, out / "base", [])
    needed = [f for f in FINE_TUNES if any(VARIANTS[r][0] == f for r in args.variants)]
    for seed in args.seeds:
        for fine_tune in needed:
            run_dir = out / f"seed{seed}" / slug(fine_tune)
            steps.append(train_step(python, run_dir, seed, fine_tune, train_options))
            model_options = [f"model.mm_projector_type={FINE_TUNES[fine_tune][1]}",
                             f"model.ckpt={run_dir / 'final' / 'trainable.safetensors'}"]
            evaluate_rows(fine_tune, seed, run_dir, model_options)
    for world_label, world in worlds.items():
        entropy_dir = out / f"visual_entropy_{slug(world_label)}"
        steps.append(entropy_step(python, entropy_dir, world, models, args.eval_options))
    return steps, evaluations


def ensure_world(world: Path, val_cooccurrence: float | None) -> None:
    ensure_shapes_world(world, val_cooccurrence, WORLD_ARGS)  # reused only if it is exactly this world


def ensure_worlds(data: Path, worlds: dict[str, Path]) -> None:
    """Build the evaluation worlds asked for, and the training world (evaluated or not), where missing."""
    for label, (folder, val_cooccurrence) in WORLDS.items():
        if label in worlds or label == TRAIN_WORLD:
            ensure_world(data / folder, val_cooccurrence)
