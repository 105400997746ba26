"""The plan of the shapes-world experiment (scripts/shapes_experiment.py): which models it trains, which rows each
table has, the two evaluation worlds, and every train.py / evaluate.py / visual_entropy.py command in order.

Each step is the exact command line a user would type, so the experiment runs the same code paths as the 7B
recipes; a step already finished by the same command line, with the same files behind it, is reused (running.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from minigpt4.common.files import sha256_file
from minigpt4.shapes.world.folder import ensure_shapes_world, first_pope_questions, pope_folder

TRAIN_CONFIG = "train_configs/shapes_adavib.yaml"
EVAL_CONFIG = "eval_configs/shapes_base.yaml"
MATCHED = "VIB matched β"
# Fine-tunes of the base model's projector: name -> (overrides of the train config, projector type to evaluate it
# with). MATCHED's β is AdaVIB's effective KL weight in the same seed's run (MatchedBeta), known once that ran.
FINE_TUNES: dict[str, tuple[list[str], str]] = {
    "linear-CE": (["model.mm_projector_type=linear"], "linear"),
    "VIB fixed β": (["model.vib.adaptive=false"], "vib"),
    "AdaVIB": (["model.vib.adaptive=true"], "vib"),
    # the controls: AdaVIB's scale without its adaptivity, and the noise without any KL
    MATCHED: (["model.vib.adaptive=false"], "vib"),
    "VIB β = 0": (["model.vib.adaptive=false", "model.vib.beta=0"], "vib"),
    # not the paper's: α from the entropy of the pooled token scaled to a word's length (docs/real_backbones.md)
    "AdaVIB length-free": (["model.vib.adaptive=true", "model.vib.entropy_of=length_free"], "vib"),
}
# The rows of every table: name -> (the fine-tune it evaluates, None for the base model itself; evaluate.py
# overrides of its own, e.g. another decoding such as ["eval.decoding=vcd"]). A row without a fine-tune has no
# seed and is evaluated once; rows of one fine-tune share its training run and its H/log V.
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "base": (None, []),
    "linear-CE": ("linear-CE", []),
    "VIB fixed β": ("VIB fixed β", []),
    "AdaVIB": ("AdaVIB", []),
    MATCHED: (MATCHED, []),
    "VIB β = 0": ("VIB β = 0", []),
    "AdaVIB length-free": ("AdaVIB length-free", []),
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
# Two evaluation worlds with one train split (seed 0, co-occurrence 0.9): label -> val co-occurrence (None: as in
# training). In-distribution val pairs anchors with partners 90 % of the time, as in training, so it holds only a
# handful of co-occurrence traps; the probe's val never does, so every anchor there is a trap.
WORLDS = {"in-distribution": None, "co-occurrence probe": 0.0}
TRAIN_WORLD = "in-distribution"  # fine-tuning reads its train split (the probe's is the same, byte for byte)
# build_shapes_world arguments beyond its defaults and the backbones' world_args; tests shrink it
WORLD_ARGS: dict = {}


class Backbones(NamedTuple):
    """What the experiment runs on: the recipes its commands override, its worlds, default rows and sizes."""

    train_config: str
    eval_config: str
    folders: dict[str, str]  # WORLDS label -> folder under --data
    world_args: dict  # build_shapes_world arguments beyond its defaults (both worlds)
    rows: tuple[str, ...]  # the table's rows when --variants is not given
    eval_options: tuple[str, ...] = ()  # evaluate.py overrides of every evaluation, before --eval-options
    pope_first: int | None = None  # POPE asks the first N questions of each split (None: all of them)


BACKBONES = {
    # the 1.3 M-parameter toy LLM trained from scratch (assets/shapes_base)
    "toy": Backbones(TRAIN_CONFIG, EVAL_CONFIG, {"in-distribution": "shapes_world",
                                                 "co-occurrence probe": "shapes_world_probe"}, {},
                     ("base", "linear-CE", "VIB fixed β", "AdaVIB", "base + VCD", "base + VCD α=0", "AdaVIB + VCD",
                      "base + OPERA", "AdaVIB + OPERA")),
    # EfficientNet-Lite0 + SmolLM2-135M (assets/real_small_base), sized to one seed in about 30 min on 2 cores:
    # 100 CHAIR images and the first 240 adversarial POPE questions (40 images) per world
    "real-small": Backbones("train_configs/real_small_adavib.yaml", "eval_configs/real_small_base.yaml",
                            {"in-distribution": "shapes_world_224", "co-occurrence probe": "shapes_world_224_probe"},
                            {"image_size": 224},
                            ("base", "linear-CE", "VIB fixed β", "AdaVIB", MATCHED, "VIB β = 0", "AdaVIB length-free",
                             "base + VCD"),
                            ("eval.chair.num_images=100", "eval.pope.splits=[adversarial]"), 240),
}
ENTROPY_FILE = "visual_entropy.json"  # scripts/visual_entropy.py's output in each world's Figure-1 step folder


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace(" = ", "_").replace(" ", "_").replace("β", "beta").replace("-", "_")


def world_options(world: Path, pope_first: int | None = None) -> list[str]:
    """evaluate.py overrides pointing the eval config at another world folder (and its POPE subset)."""
    return [
        f"eval.image_dir={world}/images",
        f"eval.pope.dir={world}/{pope_folder(pope_first)}",
        f"eval.chair.images={world}/val_images.json",
        f"eval.chair.coco_annotations={world}/annotations",
        f"eval.chair.synonyms={world}/synonyms.txt",
    ]


class MatchedBeta(NamedTuple):
    """The override `model.vib.beta=` AdaVIB's effective KL weight in another run, β·Σ_b α_b·KL_b / Σ_b KL_b
    (its logged kl_term / kl), averaged over the logged steps: the fixed β that weighs the same KLs as AdaVIB did.
    It is known only once that run has finished, so it stays a placeholder in the plan until the step runs."""

    run_dir: Path

    def __str__(self) -> str:
        return f"model.vib.beta=<mean β·α of the AdaVIB run in {self.run_dir}>"

    def resolve(self) -> str:
        log = self.run_dir / "metrics.jsonl"
        if not log.is_file():
            raise RuntimeError(f"{log}: missing; the matched-β control needs the AdaVIB run of its seed first")
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        weights = [r["kl_term"] / r["kl"] for r in records if r.get("kl", 0) > 0 and "kl_term" in r]
        if not weights:
            raise RuntimeError(f"{log}: no logged step with kl_term and kl > 0 to match β to")
        return f"model.vib.beta={sum(weights) / len(weights):.6g}"


STAMP_FILE = "command.json"  # in a step's output folder: what it ran with (Step.stamp)


def named_files(command: list[str], out_dir: Path) -> list[str]:
    """The input files a command line names after its script: the recipe after --cfg-path, a checkpoint or a
    data file given as key=path (relative to the checkout, the experiment's working directory). Files under the
    step's own output folder are its outputs, not its inputs."""
    found = []
    for part in command[2:]:
        value = part.split("=", 1)[1] if "=" in part else part
        path = Path(value)
        if value and path.is_file() and out_dir.resolve() not in path.resolve().parents:
            found.append(value)
    return found


class Step(NamedTuple):
    """One train.py / evaluate.py command, its output folder and the file that marks it finished."""

    label: str  # the group it belongs to, printed once: "base model", "seed 0, AdaVIB"
    kind: str  # "train" | "eval": steps of one kind take about as long as each other
    command: list  # str, or a MatchedBeta placeholder until the step runs
    out_dir: Path
    done_file: str

    @property
    def log_path(self) -> Path:
        return self.out_dir.parent / f"{self.out_dir.name}.{self.kind}.log"

    def resolved(self) -> list[str]:
        """The command line with its placeholders filled in (a placeholder's run must have finished)."""
        return [part if isinstance(part, str) else part.resolve() for part in self.command]

    def ready(self) -> bool:
        """False while a placeholder's run has not finished yet (a dry run cannot know its command)."""
        return all(isinstance(part, str) or (part.run_dir / "metrics.jsonl").is_file() for part in self.command)

    def stamp(self) -> dict:
        """What the step runs with: its command line and the SHA-256 of every input file it names. Editing the
        recipe, or retraining the model an evaluation reads, changes it, so the step runs again instead of
        lending its old numbers to the new report. The package's code and the weights a recipe names inside it
        are not in it: the report names the commits that produced its steps (running.step_commits)."""
        command = self.resolved()
        return {"command": command,
                "inputs": {path: sha256_file(path) for path in named_files(command, self.out_dir)}}

    def reusable(self) -> bool:
        """Finished before with the same stamp (other options or changed input files start the step afresh)."""
        stamp = self.out_dir / STAMP_FILE
        if not (self.out_dir / self.done_file).is_file() or not stamp.is_file() or not self.ready():
            return False
        return json.loads(stamp.read_text()) == self.stamp()


class Evaluation(NamedTuple):
    """One evaluate.py run of the plan: which table row, world and seed it fills, and the model it evaluates."""

    world: str  # WORLDS label
    row: str  # VARIANTS name
    seed: int | None  # None: the seed-free base model
    model: str  # the model's name in the H/log V files: "base", "seed 0, AdaVIB"
    eval_dir: Path


def train_step(python: str, backbones: Backbones, out_dir: Path, seed: int, fine_tune: str, extra: list) -> Step:
    overrides = FINE_TUNES[fine_tune][0] + [f"run.seed={seed}", f"run.output_dir={out_dir}"] + extra
    command = [python, "train.py", "--cfg-path", backbones.train_config, "--options", *overrides]
    return Step(f"seed {seed}, {fine_tune}", "train", command, out_dir, "final/trainable.safetensors")


def eval_step(python: str, backbones: Backbones, out_dir: Path, label: str, name: str, world: Path,
              options: list[str]) -> Step:
    overrides = [f"eval.output_dir={out_dir}", f"eval.name={name}",
                 *world_options(world, backbones.pope_first), *options]
    command = [python, "evaluate.py", "--cfg-path", backbones.eval_config, "--options", *overrides]
    return Step(label, "eval", command, out_dir, "metrics.json")


def entropy_step(python: str, backbones: Backbones, out_dir: Path, world: Path, models: dict[str, list[str]],
                 options: list[str]) -> Step:
    """H/log V of every CHAIR image of `world` for each model ({name: its model.* overrides})."""
    command = [python, "scripts/visual_entropy.py", "--cfg-path", backbones.eval_config,
               "--out", str(out_dir / ENTROPY_FILE)]
    for name, overrides in models.items():
        command += ["--model", name, *overrides]
    command += ["--options", *world_options(world, backbones.pope_first), *options]
    return Step("Figure 1: H/log V of the visual tokens", "entropy", command, out_dir, ENTROPY_FILE)


def eval_folder(row: str, fine_tune: str | None, world_label: str) -> str:
    """A row's evaluation folder in its model's run folder: the model's own row is named by the world alone."""
    if row == (fine_tune or "base"):
        return f"eval_{slug(world_label)}"
    return f"eval_{slug(row)}_{slug(world_label)}"


def needed_fine_tunes(variants: list[str]) -> list[str]:
    """The fine-tunes the rows evaluate, in training order; the matched-β control needs AdaVIB's run first."""
    wanted = {VARIANTS[row][0] for row in variants} | ({"AdaVIB"} if MATCHED in variants else set())
    return [name for name in FINE_TUNES if name in wanted]


def plan(args: argparse.Namespace, python: str, worlds: dict[str, Path]) -> tuple[list[Step], list[Evaluation]]:
    """Every step of the run in order (per model: its training, then its evaluations on every world; then
    one H/log V step per world) and the evaluations they make. args.backbones: a Backbones."""
    out, backbones = Path(args.out), args.backbones
    train_world = Path(args.data) / backbones.folders[TRAIN_WORLD]
    train_options = [f"datasets.shapes_qa.root={train_world}", *args.train_options]
    eval_options = [*backbones.eval_options, *args.eval_options]
    steps: list[Step] = []
    evaluations: list[Evaluation] = []
    models: dict[str, list[str]] = {}  # name in the H/log V files -> its model.* overrides of the eval config

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
                options = [*model_options, *eval_options, *VARIANTS[row][1]]
                steps.append(eval_step(python, backbones, run_dir / folder, label, row, world, options))
                evaluations.append(Evaluation(world_label, row, seed, model, run_dir / folder))

    evaluate_rows(None, None, out / "base", [])
    for seed in args.seeds:
        for fine_tune in needed_fine_tunes(args.variants):
            run_dir = out / f"seed{seed}" / slug(fine_tune)
            extra = [MatchedBeta(out / f"seed{seed}" / slug("AdaVIB"))] if fine_tune == MATCHED else []
            steps.append(train_step(python, backbones, run_dir, seed, fine_tune, train_options + extra))
            model_options = [f"model.mm_projector_type={FINE_TUNES[fine_tune][1]}",
                             f"model.ckpt={run_dir / 'final' / 'trainable.safetensors'}"]
            if any(VARIANTS[row][0] == fine_tune for row in args.variants):
                evaluate_rows(fine_tune, seed, run_dir, model_options)
    for world_label, world in worlds.items():
        entropy_dir = out / f"visual_entropy_{slug(world_label)}"
        steps.append(entropy_step(python, backbones, entropy_dir, world, models, eval_options))
    return steps, evaluations


def ensure_worlds(data: Path, worlds: dict[str, Path], backbones: Backbones) -> None:
    """Build the evaluation worlds asked for, and the training world (evaluated or not), where missing; and the
    POPE subset of each evaluation world when the backbones ask only the first N questions."""
    for label, val_cooccurrence in WORLDS.items():
        if label in worlds or label == TRAIN_WORLD:
            world = data / backbones.folders[label]
            ensure_shapes_world(world, val_cooccurrence, {**backbones.world_args, **WORLD_ARGS})
            if label in worlds and backbones.pope_first is not None:
                first_pope_questions(world, backbones.pope_first)
