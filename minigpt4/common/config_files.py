"""A config file read by the tools that build a model without training or evaluating it: the demo, the exporter,
scripts/analyze_similarity.py and scripts/visual_entropy.py.

`load_model_config` gives the validated `model:` section of an eval/train YAML (or of a file that *is* a model
section), with `model.key=value` overrides; `eval_extras` the image transform and CHAIR vocabulary the model is
evaluated with. Relative weight paths that do not exist from the working directory are looked up next to the
config file, then from the repository root, so a committed config works from any folder.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from minigpt4.common.config import (
    PATH_KEYS,
    ConfigError,
    ModelConfig,
    describe_value,
    load_yaml,
    merge,
    validate_model_config,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _model_section(path: Path) -> DictConfig:
    raw = load_yaml(path)  # a mapping, or a ConfigError naming file:line (duplicate key, tab, syntax)
    if "model" in raw:
        section = raw.model
        if not isinstance(section, DictConfig):  # model: 3, a list, an empty model: (the lookups below would fail)
            value = OmegaConf.to_container(section) if OmegaConf.is_config(section) else section
            raise ConfigError(f"{path}: model: expected a mapping of its settings (indented `key: value` lines), "
                              f"got {describe_value(value)}")
    elif set(raw.keys()) <= set(OmegaConf.structured(ModelConfig).keys()):
        section = raw  # the file is a model section itself (assets/shapes_base/model.yaml may be)
    else:
        raise ConfigError(f"{path}: no `model:` section (top-level keys: {', '.join(map(str, raw.keys()))})")
    for key in PATH_KEYS:
        value = OmegaConf.select(section, key, default=None, throw_on_missing=False)
        if isinstance(value, str):
            section[key] = _resolve_path(value, path)
    return section


def _resolve_path(value: str, config_file: Path) -> str:
    """A relative path as given if it exists from the working directory, else from the config's folder, else
    from the repository root (committed configs name files like assets/shapes_base/tokenizer); unchanged
    when none exists, so the usual "path not found" error names it as written."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    for base in (config_file.parent, REPO_ROOT):
        if (base / value).exists():
            return str(base / value)
    return value


@dataclass
class _ModelOnly:
    model: ModelConfig = field(default_factory=ModelConfig)


def load_model_config(cfg_path: str | os.PathLike, options: list[str] | None = None) -> DictConfig:
    """The validated `model:` config of a YAML file; `options` are `model.key=value` overrides."""
    path = Path(cfg_path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    for option in options or []:
        if not option.startswith("model."):
            raise ConfigError(f"--options {option!r}: only the model section is read here; write model.<key>=value")
    # Merged under a `model` key so every error names the key as the user writes it (model.llm_path).
    cfg = merge(_ModelOnly, {"model": _model_section(path)}, options=options, where=str(path)).model
    validate_model_config(cfg)
    return cfg


def eval_extras(cfg_path: str | os.PathLike | None) -> tuple[dict | None, str | None]:
    """(eval.vis_processor, eval.chair.synonyms) of a config file when it has them: the image transform and
    CHAIR vocabulary the model is evaluated with are the right ones for the demo too."""
    if cfg_path is None:
        return None, None
    raw = load_yaml(cfg_path)
    vis = OmegaConf.select(raw, "eval.vis_processor", default=None, throw_on_missing=False)
    synonyms = OmegaConf.select(raw, "eval.chair.synonyms", default=None, throw_on_missing=False)
    if synonyms is not None:
        synonyms = _resolve_path(str(synonyms), Path(cfg_path))
        if not os.path.isfile(synonyms):
            log.warning("%s: eval.chair.synonyms %s not found; highlighting COCO objects", cfg_path, synonyms)
            synonyms = None
    vis = OmegaConf.to_container(vis, resolve=True) if vis is not None else None
    return vis, synonyms
