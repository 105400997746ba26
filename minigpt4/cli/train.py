"""Train a projector (linear, VIB or AdaVIB) on a frozen MiniGPT-4 / LLaVA-1.5.

`python train.py` in a checkout and `adavib-train` once installed both run this module (the top-level train.py
only hands over to it).

    python train.py --cfg-path train_configs/tiny_cpu.yaml
    torchrun --nproc_per_node=8 train.py --cfg-path train_configs/adavib_minigpt4_7b.yaml \
        --options model.llm_path=/weights/vicuna-7b run.output_dir=out/adavib
    python train.py --cfg-path ... --resume          # continue from output_dir/checkpoints/latest

Config layers, later wins: schema defaults (model, run) < dataset builder defaults < the recipe YAML <
`--options key=value ...`. Everything is validated (unknown keys, types, paths) before a model is built.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from minigpt4.common.config import ConfigError, ModelConfig, merge, training_run_settings, validate_model_config
from minigpt4.runners.config import RunConfig


@dataclass
class TrainConfig:
    """A training recipe: every section typed (the datasets' per builder, minigpt4/datasets/options.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: dict[str, Any] = field(default_factory=dict)  # builder name -> its options
    run: RunConfig = field(default_factory=RunConfig)


# Under the schema defaults: run.amp left out of the recipe follows model.precision (resolve_training_amp).
_RUN_AMP_FOLLOWS_PRECISION = {"run": {"amp": None}}


def load_train_config(cfg_path: str, options: list[str] | None = None, *, resume: bool = False):
    """-> (resolved DictConfig, RunConfig): each section merged into its schema and checked by its one
    validate (model, datasets, run), before any model is built. Raises ConfigError naming the offending key."""
    from minigpt4.common.dist import device_problem
    from minigpt4.datasets.builders import validate_datasets

    options = list(options or [])
    if resume:
        options.append("run.resume=true")
    cfg = merge(TrainConfig, _RUN_AMP_FOLLOWS_PRECISION, cfg_path, options=options, where=cfg_path)
    validate_model_config(cfg.model)
    if not cfg.datasets:
        raise ConfigError(f"{cfg_path}: `datasets:` is empty; name at least one dataset builder")
    try:
        validate_datasets(cfg.datasets)
        run = RunConfig(**training_run_settings(cfg.model.precision, OmegaConf.to_container(cfg.run, resolve=True)))
        if (problem := device_problem(run.device)) is not None:  # cuda where torch sees no GPU
            raise ConfigError(problem)
    except ConfigError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None
    OmegaConf.update(cfg, "run.amp", run.amp)  # recorded as trained: the amp model.precision chose
    return cfg, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", required=True, help="recipe YAML (train_configs/*.yaml)")
    ap.add_argument("--options", nargs="*", default=[], help="overrides, e.g. run.init_lr=1e-5 model.vib.beta=0")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.output_dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg, run = load_train_config(args.cfg_path, args.options, resume=args.resume)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    import torch
    from torch.utils.data import IterableDataset

    from minigpt4.common import dist
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.output_dir import claim_output_dir, storage_reason
    from minigpt4.common.provenance import write_provenance
    from minigpt4.datasets.builders import build_train_dataset
    from minigpt4.datasets.builders import files_to_record as dataset_files
    from minigpt4.models.from_config import build_model
    from minigpt4.models.loading import files_to_record as weight_files
    from minigpt4.runners.runner import Runner

    rank, world, device = dist.init_command_processes(run.device)
    torch.manual_seed(run.seed)  # model init (projector std head, prior) is the same on every rank
    lock = runner = model = None
    try:
        dataset, collate = build_train_dataset(cfg.datasets, rank=rank, world_size=world, seed=run.seed)
        # an epoch with no optimizer step is refused before the model is built and the output folder made
        run.check_dataset_size(None if isinstance(dataset, IterableDataset) else len(dataset), world)
        lock = claim_output_dir(run.output_dir, "run.output_dir")  # one run at a time in a folder
        model = build_model(cfg.model, device=device)
        runner = Runner(model, dataset, collate, run, config_to_save=OmegaConf.to_container(cfg, resolve=True))
        runner.prepare()  # refuses an old run without --resume, another data order, no complete checkpoint
        if rank == 0:  # commit, versions and SHA-256 of every weight/data file, only for a run that goes ahead
            config = OmegaConf.to_container(cfg, resolve=True)
            write_provenance(config, run.output_dir, weight_paths=weight_files(config["model"]),
                             data_paths=dataset_files(config["datasets"]), device=device)
        summary = runner.train()
    except USER_FACING_ERRORS as err:  # a bad file: its message names it; a torch traceback would bury that
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk under metrics.jsonl, config.json, ...: not a bug
        if (reason := storage_reason(err, run.output_dir)) is None:
            raise
        print(f"error: {err.filename or run.output_dir}: {reason}; free space or fix the permissions and run "
              "again (with --resume to continue)", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
        # On every way out, exit 2 included: the DDP wrapper goes before the process group (see dist.cleanup),
        # and the group is left, or a rank that stops on an error can abort at exit (gloo's threads still up).
        del runner, model
        dist.cleanup()
    if rank == 0:
        logging.info("done: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
        logging.info("outputs in %s (metrics.jsonl, checkpoints/, final/trainable.safetensors)",
                     os.path.abspath(run.output_dir))
    return 0

if __name__ == "__main__":
    sys.exit(main())
