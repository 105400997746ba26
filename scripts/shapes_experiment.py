"""The shapes-world AdaVIB experiment: does the VIB projector make the base model hallucinate less?

    python scripts/shapes_experiment.py                    # one seed: 16 min measured on 2 busy CPU cores
    python scripts/shapes_experiment.py --seeds 0 1 2      # three seeds, mean ± std over seeds
    python scripts/shapes_experiment.py --dry-run          # print the plan (every command line), run nothing
    python scripts/shapes_experiment.py --backbones real-small --out out/real_small_experiment   # real backbones

With --backbones real-small the same steps run on EfficientNet-Lite0 + SmolLM2-135M (assets/real_small_base,
train_configs/real_small_adavib.yaml) in 224 px worlds (data/shapes_world_224, data/shapes_world_224_probe), with
the two controls (β matched to AdaVIB's effective KL weight, β = 0) and the length-free α ablation as rows, on 100
CHAIR images and the first 240 adversarial POPE questions of each world.

Steps, each skipped when its output is already there from the same command and the same files it names (its
recipe, the checkpoint it reads), so a rerun resumes; the report names the commits that produced the steps:
1. build the two evaluation worlds (data/shapes_world, data/shapes_world_probe) if they are missing (seconds);
2. evaluate the base model (assets/shapes_base) on CHAIR and POPE random/popular/adversarial;
3. for each seed, fine-tune only its projector three ways with train_configs/shapes_adavib.yaml — linear-CE,
   VIB with a fixed β, AdaVIB — on the same data, steps and seed, and evaluate each the same way;
4. the paper's Figure 1: H/log V of every val image's pooled visual tokens for each model
   (scripts/visual_entropy.py), against whether its CHAIR caption hallucinates (minigpt4.eval.entropy_correlation);
5. print and write <out>/results.md and results.json: every metric with its 95 % bootstrap interval over
   images, the paired bootstrap difference of each variant against linear-CE (minigpt4.eval.paired), the rank
   correlation of H/log V with hallucination per model, and <out>/figure1.png (hallucination rate by H/log V bin).

The plan, the running of its steps and the report are minigpt4/shapes/experiment/{plan,running,report}.py.
Training and evaluation run as `train.py` / `evaluate.py` subprocesses with the exact command lines a user
would type (printed as they start), so the experiment exercises the same code paths as the 7B recipes. The run
shows where it stands: step k of N, elapsed time and an estimate of what is left after each step, and the running
step's own progress line (its tqdm bar) live; each step's full output is kept in <step folder>.<kind>.log.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from minigpt4.common.results_header import load_average, publish, publish_path, results_header
from minigpt4.shapes.experiment.plan import (
    BACKBONES,
    BASELINE,
    TRAIN_WORLD,
    VARIANTS,
    WORLDS,
    ensure_worlds,
    plan,
    slug,
)
from minigpt4.shapes.experiment.report import report
from minigpt4.shapes.experiment.running import print_plan, run_plan, step_commits

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (several: mean ± std)")
    parser.add_argument("--out", default="out/shapes_experiment", help="output folder")
    parser.add_argument("--data", default="data", help="where the two evaluation worlds live (built if missing)")
    parser.add_argument("--backbones", choices=list(BACKBONES), default="toy",
                        help="toy: the 1.3 M-parameter LLM of assets/shapes_base (train_configs/shapes_adavib.yaml); "
                             "real-small: EfficientNet-Lite0 + SmolLM2-135M of assets/real_small_base "
                             "(train_configs/real_small_adavib.yaml, 224 px worlds, fewer CHAIR/POPE items)")
    parser.add_argument("--train-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the train config for every variant, e.g. model.vib.beta=1e-2")
    parser.add_argument("--eval-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the eval config for every evaluation, e.g. eval.batch_size=64")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help=f"table rows (default: the backbones' rows; base and {BASELINE} are always there)")
    world_slugs = [slug(w) for w in WORLDS]
    parser.add_argument("--worlds", nargs="+", default=world_slugs, choices=world_slugs,
                        help=f"evaluation worlds (fine-tuning reads the {TRAIN_WORLD} world's train split, built "
                             "if missing)")
    parser.add_argument("--dry-run", action="store_true", help="print every step's command line; run nothing")
    parser.add_argument("--publish", type=publish_path, metavar="PATH.md",
                        help="also copy results.md there when done, e.g. docs/results/shapes_experiment.md")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    args.backbones = BACKBONES[args.backbones]
    asked = args.variants or args.backbones.rows
    args.variants = [name for name in VARIANTS if name in {"base", BASELINE, *asked}]  # in table order
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if importlib.util.find_spec("matplotlib") is None:  # figure1.png: found missing before the steps, not after
        raise RuntimeError("the Figure-1 plot needs matplotlib: pip install -e '.[demo]'")
    worlds = {label: Path(args.data) / args.backbones.folders[label] for label in WORLDS if slug(label) in args.worlds}
    steps, evaluations = plan(args, sys.executable, worlds)
    if args.dry_run:
        print_plan(steps)
        return 0
    start, load_before = time.perf_counter(), load_average()
    ensure_worlds(Path(args.data), worlds, args.backbones)
    run_plan(steps)
    header = f"{results_header(load_before)} {step_commits(steps)}"
    print("\n" + report(args, worlds, evaluations, header=header))
    print(f"written {Path(args.out) / 'results.md'}, results.json and figure1.png in "
          f"{time.perf_counter() - start:.0f} s")
    if args.publish:
        print(f"published {publish(Path(args.out) / 'results.md', args.publish)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
