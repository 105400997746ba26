"""The evaluation plan: what a run will ask and how, settled once, before any model is built, and passed down.

    plan = plan_evaluation(cfg_path, options)   # validated settings -> each task's protocol run -> its items
    plan = guard_resume(plan, device_type)      # -> each answers file's fingerprint (minigpt4/eval/fingerprint.py)

Each task's protocol is resolved here and only here (protocol_runs.resolve_run); the items' prompts, the
fingerprints, generation, scoring and metrics.json all read it from the plan (minigpt4/eval/task_runs.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from minigpt4.common.config import ConfigError
from minigpt4.eval.benchmark_runs import check_bootstrap_size, planned_items
from minigpt4.eval.eval_config import load_eval_config
from minigpt4.eval.generate import GenerationItem
from minigpt4.eval.protocol_runs import ProtocolRun, protocol_runs
from minigpt4.eval.settings import DEFAULT_TEMPLATE, EvalSettings


@dataclass(frozen=True)
class EvalPlan:
    settings: EvalSettings  # the validated `eval:` section
    runs: dict[str, ProtocolRun]  # task -> its protocol as this run applies it
    items: dict[str, list[GenerationItem]]  # answers file name -> its generation items
    cfg: Optional[DictConfig] = None  # the whole validated config: the model's section, provenance, metrics.json
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # answers file name -> what decides it


def plan_tasks(settings: EvalSettings, template: str = DEFAULT_TEMPLATE, cfg: Optional[DictConfig] = None) -> EvalPlan:
    """The plan of `settings` for a model of prompt template `template`: each task's protocol run and its items
    (read from the POPE question files and the CHAIR image list), and eval.bootstrap checked against them."""
    runs = protocol_runs(settings, template)
    items = planned_items(settings, runs)
    check_bootstrap_size(settings, items)  # the resampling arrays for these images must fit, before generation
    return EvalPlan(settings=settings, runs=runs, items=items, cfg=cfg)


def plan_evaluation(cfg_path: Optional[str], options: Optional[list[str]] = None) -> EvalPlan:
    """The plan of an eval config file (with `options` on top). A bad key or value, a malformed or empty benchmark
    file, an image name outside eval.image_dir, a CHAIR list entry that names no COCO image or one named twice,
    (on_bad_image=error) a CHAIR image missing, or an eval.bootstrap too large for these images is a ConfigError
    naming the key or file, before any model is built."""
    cfg = load_eval_config(cfg_path, options)
    settings: EvalSettings = OmegaConf.to_object(cfg.eval)
    try:
        return plan_tasks(settings, cfg.model.prompt_template, cfg)
    except ConfigError:
        raise
    except ValueError as err:  # the readers' errors name the file and line
        raise ConfigError(str(err)) from None
