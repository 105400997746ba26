"""Evaluate a model on POPE and CHAIR.

`python evaluate.py` in a checkout and `adavib-eval` once installed both run this module (the top-level evaluate.py
only hands over to it).

    python evaluate.py --cfg-path eval_configs/adavib_minigpt4_7b.yaml \
        --options model.ckpt=out/adavib/final/trainable.safetensors eval.image_dir=/data/coco/val2014
    torchrun --nproc_per_node=8 evaluate.py --cfg-path ...      # questions/images sharded over GPUs

Answers and captions are appended to JSONL files in eval.output_dir as they are produced; rerunning the same
command resumes where a killed run stopped. Results: {output_dir}/metrics.json (read by
scripts/results_table.py), plus pope.json / chair.json with per-split / per-caption detail.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from minigpt4.common.config import ConfigError
from minigpt4.eval.eval_logging import check_backends
from minigpt4.eval.plan import plan_evaluation

ROOT = Path(__file__).resolve().parents[2]  # the checkout: eval_configs/, assets/, data/
# With no --cfg-path: the committed shapes-world base model on the shapes-world val split, so a newcomer
# sees real CHAIR/POPE numbers without downloading anything (the world is generated in seconds if missing).
DEFAULT_CFG = ROOT / "eval_configs" / "shapes_base.yaml"
DEFAULT_WORLD = ROOT / "data" / "shapes_world"


def default_config_path() -> str:
    """The embedded default's config, building its evaluation world first if it is not there yet."""
    if not (DEFAULT_WORLD / "meta.json").is_file():
        from minigpt4.shapes.world.scenes import build_shapes_world

        logging.info("building the shapes world in %s (seconds)", DEFAULT_WORLD)
        build_shapes_world(DEFAULT_WORLD)
    return str(DEFAULT_CFG)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", help="eval YAML (eval_configs/*.yaml); default: the embedded shapes-world "
                                       "base model, eval_configs/shapes_base.yaml (paths from the repository root)")
    ap.add_argument("--options", nargs="*", default=[], help="overrides, e.g. eval.batch_size=32 model.ckpt=...")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cfg_path is None:
        if not DEFAULT_CFG.is_file():  # an installed package has no eval_configs/ or assets/
            print(f"config error: no --cfg-path given, and the embedded shapes-world default ({DEFAULT_CFG}) is "
                  "part of a checkout of the repository, not of the installed package; give --cfg-path",
                  file=sys.stderr)
            return 2
        os.chdir(ROOT)  # the default config's paths are relative to the repository root
        args.cfg_path = default_config_path()
        logging.info("no --cfg-path: evaluating the embedded shapes-world base model (%s)", args.cfg_path)
    try:  # 1. the plan: validated settings -> each task's protocol run -> its items, before any model
        plan = plan_evaluation(args.cfg_path, args.options)
        check_backends(plan.settings.tensorboard, plan.settings.wandb)  # a missing package stops here, not after
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from minigpt4.common import dist
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.output_dir import claim_output_dir
    from minigpt4.eval.fingerprint import guard_resume
    from minigpt4.eval.task_runs import check_planned_prompt_lengths, run_tasks, write_results, write_run_records
    from minigpt4.models.from_config import build_model

    rank, _, device = dist.init_command_processes(plan.settings.device)
    lock = None
    try:
        lock = claim_output_dir(plan.settings.output_dir, "eval.output_dir")  # one evaluation at a time in a folder
        # 2. the fingerprints: answers already in the folder must come from these weights and settings, refused
        # here, before the model
        plan = guard_resume(plan, device.type)
        model = build_model(plan.cfg.model, device=device).eval()  # 3. the model
        check_planned_prompt_lengths(model, plan)  # every task's, before the first answer
        write_run_records(plan, device)  # provenance.json and the fingerprints (rank 0)
        results = run_tasks(model, plan)  # 4. generate and score each task
    except USER_FACING_ERRORS as err:  # a bad file: its message names it; a torch traceback would bury that
        print(f"error: {err}", file=sys.stderr)
        if lock is not None:
            lock.release()
        dist.cleanup()  # leave the process group on the way out too, as train.py does
        return 2
    if rank == 0:
        write_results(results, plan)  # 5. pope.json, chair.json, metrics.json
    lock.release()
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
