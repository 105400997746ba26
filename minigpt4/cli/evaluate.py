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

from omegaconf import OmegaConf

from minigpt4.common.config import ConfigError
from minigpt4.common.jsonfiles import write_json
from minigpt4.eval.eval_config import load_eval_config
from minigpt4.eval.eval_logging import check_backends, log_evaluation
from minigpt4.eval.labels import projector_label
from minigpt4.eval.protocol_runs import protocol_runs
from minigpt4.eval.settings import EvalSettings

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
    try:
        cfg = load_eval_config(args.cfg_path, args.options)
        settings: EvalSettings = OmegaConf.to_object(cfg.eval)
        runs = protocol_runs(settings, cfg.model.prompt_template)  # task -> its protocol as this run applies it
        planned = read_benchmark_items(settings, runs)
        check_backends(settings.tensorboard, settings.wandb)  # a missing package stops here, not after the run
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from minigpt4.common import dist
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.output_dir import claim_output_dir
    from minigpt4.common.provenance import write_provenance
    from minigpt4.eval.benchmark_runs import check_planned_prompt_lengths, run_chair, run_pope
    from minigpt4.eval.fingerprint import guard_resume, write_fingerprints
    from minigpt4.eval.settings import files_to_record as benchmark_files
    from minigpt4.models.from_config import build_model
    from minigpt4.models.loading import files_to_record as weight_files

    rank, _, device = dist.init_command_processes(settings.device)
    lock = None
    try:
        lock = claim_output_dir(settings.output_dir, "eval.output_dir")  # one evaluation at a time in a folder
        # answers already in the folder must come from these weights and settings: refused here, before the model
        fingerprints = guard_resume(OmegaConf.to_container(cfg.model, resolve=True), settings, planned, device.type)
        model = build_model(cfg.model, device=device).eval()
        check_planned_prompt_lengths(model, settings, planned, runs)  # every task's, before the first answer
        out_dir = settings.output_dir
        os.makedirs(out_dir, exist_ok=True)
        if rank == 0:  # commit, versions and SHA-256 of the weights and benchmark files
            config = OmegaConf.to_container(cfg, resolve=True)
            write_provenance(config, out_dir, weight_paths=weight_files(config["model"]),
                             data_paths=benchmark_files(settings), device=device)
            write_fingerprints(out_dir, fingerprints)
        results = {"model": settings.name, "projector": projector_label(cfg.model)}
        if "pope" in settings.tasks:
            results["pope"] = run_pope(model, settings, out_dir, runs["pope"])
        if "chair" in settings.tasks:
            results["chair"] = run_chair(model, settings, out_dir, runs["chair"])
    except USER_FACING_ERRORS as err:  # a bad file: its message names it; a torch traceback would bury that
        print(f"error: {err}", file=sys.stderr)
        if lock is not None:
            lock.release()
        dist.cleanup()  # leave the process group on the way out too, as train.py does
        return 2
    if rank == 0:
        write_results(results, cfg, settings, runs)
    lock.release()
    dist.cleanup()
    return 0


def write_results(results: dict, cfg, settings: EvalSettings, runs: dict) -> None:
    """Rank 0: pope.json / chair.json with their detail, metrics.json (read by scripts/results_table.py) and the
    TensorBoard / W&B views of them."""
    from minigpt4.common.provenance import weight_digests
    from minigpt4.models.loading import files_to_record as weight_files

    out_dir = settings.output_dir
    results["protocol"] = protocol_label(runs, settings)
    results["protocols"] = {task: run.summary() for task, run in runs.items()}
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    for task in ("pope", "chair"):
        if task in results:
            write_json(os.path.join(out_dir, f"{task}.json"), results[task])
    summary = {k: v for k, v in results.items() if k != "config"}
    # the weights these numbers describe (SHA-256, file names only): the exporter's --metrics checks them
    summary["weights"] = weight_digests(weight_files(results["config"]["model"]))
    if "chair" in summary:  # per-caption detail stays in chair.json
        summary["chair"] = {k: v for k, v in summary["chair"].items() if k != "per_caption"}
    write_json(os.path.join(out_dir, "metrics.json"), summary)
    logging.info("results in %s", os.path.abspath(os.path.join(out_dir, "metrics.json")))
    if settings.tensorboard or settings.wandb:  # views of the files just written (eval/eval_logging.py)
        log_evaluation(out_dir, results, tensorboard=settings.tensorboard, wandb=settings.wandb,
                       wandb_project=settings.wandb_project, config=results["config"])


def read_benchmark_items(settings: EvalSettings, runs: dict) -> dict:
    """Every answers file's generation items, read now from the POPE question files and the CHAIR image list:
    a malformed or empty file, an image name outside eval.image_dir, a CHAIR list entry that names no COCO image or
    one named twice, (on_bad_image=error) a CHAIR image missing from it, or an eval.bootstrap too large for these
    images stops the run before the model is built."""
    from minigpt4.eval.benchmark_runs import check_bootstrap_size, planned_items

    try:
        planned = planned_items(settings, runs)
    except ConfigError:
        raise
    except ValueError as err:  # the readers' errors name the file and line
        raise ConfigError(str(err)) from None
    check_bootstrap_size(settings, planned)  # the resampling arrays for these images must fit, before generation
    return planned


def protocol_label(runs: dict, settings: EvalSettings) -> str:
    """The results table's protocol column: each task's protocol label, POPE with its question files."""
    labels = []
    if "pope" in runs:
        data = settings.pope.version if settings.pope.dir is None else f"dir {settings.pope.dir}"
        labels.append(f"{runs['pope'].label} ({data})")
    if "chair" in runs:
        labels.append(runs["chair"].label)
    return " + ".join(labels)


if __name__ == "__main__":
    sys.exit(main())
