#!/usr/bin/env python
"""Evaluate a model on POPE and CHAIR.

    python evaluate.py --cfg-path eval_configs/adavib_minigpt4_7b.yaml \
        --options model.ckpt=out/adavib/final/trainable.safetensors eval.image_dir=/data/coco/val2014
    torchrun --nproc_per_node=8 evaluate.py --cfg-path ...      # questions/images sharded over GPUs

Answers and captions are appended to JSONL files in eval.output_dir as they are produced; rerunning the same
command resumes where a killed run stopped. Results: {output_dir}/metrics.json (read by
scripts/results_table.py), plus pope.json / chair.json with per-split / per-caption detail.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from minigpt4.common.config import ConfigError, ModelConfig, check_paths, merge, validate_model_config
from minigpt4.eval.tasks import EvalSettings, validate_eval_settings


ROOT = Path(__file__).resolve().parent
# With no --cfg-path: the committed shapes-world base model on the shapes-world val split, so a newcomer
# sees real CHAIR/POPE numbers without downloading anything (the world is generated in seconds if missing).
DEFAULT_CFG = ROOT / "eval_configs" / "shapes_base.yaml"
DEFAULT_WORLD = ROOT / "data" / "shapes_world"


def default_config_path() -> str:
    """The embedded default's config, building its evaluation world first if it is not there yet."""
    if not (DEFAULT_WORLD / "meta.json").is_file():
        from minigpt4.datasets.shapes_world import build_shapes_world

        logging.info("building the shapes world in %s (seconds)", DEFAULT_WORLD)
        build_shapes_world(DEFAULT_WORLD)
    return str(DEFAULT_CFG)


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)


def load_eval_config(cfg_path: str | None, options: list[str] | None = None):
    layers = [cfg_path] if cfg_path else []
    cfg = merge(EvalConfig, *layers, options=options, where=cfg_path or "evaluate.py")
    validate_model_config(cfg.model)
    ev = cfg.eval
    unknown = sorted(set(ev.tasks) - {"pope", "chair"})
    if unknown or not ev.tasks:
        raise ConfigError(f"eval.tasks = {list(ev.tasks)}; expected a non-empty list of: pope, chair")
    if ev.image_dir is None:
        raise ConfigError("eval.image_dir must name the folder of evaluation images (e.g. COCO val2014)")
    check_paths(ev, ("image_dir",), prefix="eval")
    if ev.pope.rule not in ("reference", "first-sentence"):
        raise ConfigError(f"eval.pope.rule = {ev.pope.rule!r}; expected reference or first-sentence")
    if ev.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"eval.on_bad_image = {ev.on_bad_image!r}; expected error or skip")
    if "chair" in ev.tasks:
        if ev.chair.coco_annotations is None:
            raise ConfigError("eval.chair.coco_annotations must name the folder with the COCO 2014 "
                              "instances_*/captions_* files (CHAIR ground truth)")
        check_paths(ev.chair, ("coco_annotations", "images", "synonyms"), prefix="eval.chair")
    if "pope" in ev.tasks:
        check_paths(ev.pope, ("dir",), prefix="eval.pope")
    validate_eval_settings(ev)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", help="eval YAML (eval_configs/*.yaml); default: the embedded shapes-world "
                                       "base model, eval_configs/shapes_base.yaml (paths from the repository root)")
    ap.add_argument("--options", nargs="*", default=[], help="overrides, e.g. eval.batch_size=32 model.ckpt=...")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cfg_path is None:
        os.chdir(ROOT)  # the default config's paths are relative to the repository root
        args.cfg_path = default_config_path()
        logging.info("no --cfg-path: evaluating the embedded shapes-world base model (%s)", args.cfg_path)
    try:
        cfg = load_eval_config(args.cfg_path, args.options)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from minigpt4.common import dist
    from minigpt4.common.provenance import write_provenance
    from minigpt4.eval.tasks import run_chair, run_pope
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.models.builder import build_model

    settings: EvalSettings = OmegaConf.to_object(cfg.eval)
    rank, _, _, device = dist.init_distributed(settings.device)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        model = build_model(cfg.model, device=device).eval()
        out_dir = settings.output_dir
        os.makedirs(out_dir, exist_ok=True)
        if rank == 0:  # commit, versions and SHA-256 of the weights and benchmark files
            write_provenance(OmegaConf.to_container(cfg, resolve=True), out_dir, device=device)
        results = {"model": settings.name, "projector": projector_label(cfg.model)}
        protocols = []
        if "pope" in settings.tasks:
            results["pope"] = run_pope(model, settings, out_dir)
            protocols.append(f"pope-{results['pope'].get('pope_version', settings.pope.version)}-{settings.pope.rule}"
                             if rank == 0 else "")
        if "chair" in settings.tasks:
            results["chair"] = run_chair(model, settings, out_dir)
            protocols.append(results["chair"].get("protocol", ""))
    except USER_FACING_ERRORS as err:  # a bad file: its message names it; a torch traceback would bury that
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        results["protocol"] = " + ".join(p for p in protocols if p)
        results["config"] = OmegaConf.to_container(cfg, resolve=True)
        for task in ("pope", "chair"):
            if task in results:
                _write_json(os.path.join(out_dir, f"{task}.json"), results[task])
        summary = {k: v for k, v in results.items() if k != "config"}
        if "chair" in summary:  # per-caption detail stays in chair.json
            summary["chair"] = {k: v for k, v in summary["chair"].items() if k != "per_caption"}
        _write_json(os.path.join(out_dir, "metrics.json"), summary)
        logging.info("results in %s", os.path.abspath(os.path.join(out_dir, "metrics.json")))
    dist.cleanup()
    return 0


def projector_label(model_cfg) -> str:
    """linear | vib-fixed-beta (β=…) | adavib (β=…): what the results table's projector column shows."""
    if model_cfg.mm_projector_type == "linear":
        return "linear"
    kind = "adavib" if model_cfg.vib.adaptive else "vib-fixed-beta"
    return f"{kind} (β={model_cfg.vib.beta:g}, S={model_cfg.vib.num_samples})"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
