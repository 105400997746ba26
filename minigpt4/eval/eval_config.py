"""An eval config file as a whole: its `model:` and `eval:` sections merged into their typed schemas and checked by
their one validate each. evaluate.py reads its config through this (minigpt4/eval/plan.py, which then resolves each
task's protocol), and so do the scripts that evaluate (scripts/visual_entropy.py: they resolve the protocols they
use with protocol_runs)."""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from minigpt4.common.config import ModelConfig, merge, validate_model_config
from minigpt4.eval.settings import EvalSettings, validate_eval_settings


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)


def load_eval_config(cfg_path: str | None, options: list[str] | None = None) -> DictConfig:
    """model and eval merged into their schemas and checked by their one validate each; ConfigError naming the key."""
    layers = [cfg_path] if cfg_path else []
    cfg = merge(EvalConfig, *layers, options=options, where=cfg_path or "evaluate.py")
    validate_model_config(cfg.model)
    validate_eval_settings(cfg.eval)
    return cfg
