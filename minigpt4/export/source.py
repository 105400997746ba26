"""The model an export writes: its config, built from local files only, with the checks an export needs on top of
the builder's (every part's weights come from a file; the projector file holds the projector the config names)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from minigpt4.models.checkpoints import CheckpointError, load_state_file

log = logging.getLogger(__name__)

# Which formats can hold which architecture, and why the others cannot (said in the error).
FORMATS = {"minigpt4": ("blip2-hf", "minigpt4-pth"), "llava15": ("llava-hf",)}
CANNOT_HOLD = {
    ("minigpt4", "llava-hf"): "a llava-hf folder has no place for MiniGPT-4's Q-Former and query tokens "
                              "(LLaVA feeds CLIP patches straight into an MLP)",
    ("llava15", "blip2-hf"): "BLIP-2 needs a Q-Former and a single Linear language_projection; LLaVA-1.5 has "
                             "neither (CLIP patches -> 2-layer MLP)",
    ("llava15", "minigpt4-pth"): "MiniGPT-4's projector file holds one Linear (llama_proj); LLaVA-1.5's projector "
                                 "is a 2-layer MLP (linear_1, GELU, linear_2)",
}
# MiniGPT-4 variants without a Q-Former: only the projector file holds them (a BLIP-2 folder has no place for
# their encoder). visual_tokens -> (how messages name the model, why blip2-hf cannot hold it).
_NO_QFORMER = {
    "vit_patch4": ("MiniGPT-4's Llama-2 variant (model.visual_tokens = 'vit_patch4')",
                   "BLIP-2 has a Q-Former between the ViT and the projector; this variant feeds groups of "
                   "concatenated ViT patch tokens to the projector instead"),
    "cnn_grid": ("the real-small model (model.visual_tokens = 'cnn_grid': EfficientNet-Lite0 feature map)",
                 "BLIP-2 has a ViT and a Q-Former before the projector; this variant feeds rows of a CNN's "
                 "feature map to the projector instead, which no Hugging Face vision-to-text class holds"),
}
_ENCODER_SOURCES = ("encoder_path", "blip2_hf_path", "vit_path", "full_ckpt")
_VIB_KEY = "projector.llama_proj_std."


class ExportError(ValueError):
    """The export cannot be written as asked; the message names the key, file or format and what to do."""


@dataclass
class ExportSource:
    """A built model and what the model card needs to say about it."""

    cfg: DictConfig  # the validated model config
    model: object  # MiniGPT4 or Llava15, eval mode
    cfg_path: str
    train_config: dict | None  # resolved training config of the run that wrote the checkpoint
    train_config_path: str | None
    vis_processor: dict | None  # eval.vis_processor of the config file, when it has one


def available_formats(cfg: DictConfig) -> tuple[tuple[str, ...], str]:
    """(the formats that can hold this model, how to name it in messages)."""
    visual_tokens = cfg.get("visual_tokens", "qformer") if cfg.arch == "minigpt4" else None
    if visual_tokens in _NO_QFORMER:
        return ("minigpt4-pth",), _NO_QFORMER[visual_tokens][0]
    return FORMATS[cfg.arch], f"model.arch = {cfg.arch!r}"


def choose_formats(cfg: DictConfig, requested: list[str] | None) -> tuple[str, ...]:
    """The formats to write: all that the model has by default; a format that cannot hold it is an error."""
    formats, what = available_formats(cfg)
    if not requested:
        return formats
    for name in requested:
        if name not in formats:
            reason = CANNOT_HOLD.get((cfg.arch, name), f"unknown format {name!r}")
            if name == "blip2-hf" and name in FORMATS[cfg.arch]:
                reason = _NO_QFORMER[cfg.visual_tokens][1]
            raise ExportError(f"--format {name} cannot hold {what}: {reason}; formats for it: " + ", ".join(formats))
    return tuple(dict.fromkeys(requested))


def state_keys(path: str) -> set[str]:
    """Tensor names of a state file, without reading the tensors when it is safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return set(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return set(load_state_file(path, check_values=False))


def check_weight_sources(cfg: DictConfig, formats: tuple[str, ...]) -> None:
    """A Hugging Face export writes the frozen parts too: each must come from a file, never from random
    initialisation (the MiniGPT-4 .pth holds the projector alone, so only the projector is checked for it)."""
    if cfg.low_resource:
        raise ExportError("model.low_resource loads the LLM in 8 bits; the export formats hold fp32/fp16/bf16 "
                          "tensors: export without model.low_resource")
    missing = []
    if formats == ("minigpt4-pth",):
        if all(cfg.get(key) is None for key in ("ckpt", "projector_path", "full_ckpt")):
            missing.append("--ckpt / model.ckpt / model.projector_path (the projector)")
    elif cfg.arch == "llava15":
        if cfg.llava_path is None:
            missing.append("model.llava_path (the CLIP tower and the LLM)")
    else:
        if all(cfg.get(key) is None for key in _ENCODER_SOURCES):
            missing.append("model.encoder_path / blip2_hf_path / vit_path+qformer_path (the ViT and Q-Former)")
        if cfg.llm_path is None and cfg.full_ckpt is None:
            missing.append("model.llm_path (the LLM)")
        if all(cfg.get(key) is None for key in ("ckpt", "projector_path", "full_ckpt")):
            missing.append("--ckpt / model.ckpt / model.projector_path (the projector)")
    if missing:
        raise ExportError("no weight file for " + "; ".join(missing) + ": those parts would be randomly "
                          "initialised, and an export writes only weights read from files")


def check_projector_file(cfg: DictConfig) -> None:
    """The checkpoint must hold the projector kind the config asks for (a VIB export writes its σ head)."""
    ckpt_vib = cfg.ckpt is not None and any(k.startswith(_VIB_KEY) for k in state_keys(cfg.ckpt))
    full_vib = cfg.full_ckpt is not None and any(k.startswith(_VIB_KEY) for k in state_keys(cfg.full_ckpt))
    if cfg.mm_projector_type == "vib" and not (ckpt_vib or full_vib):
        if cfg.ckpt is not None:
            raise ExportError(f"{cfg.ckpt} holds a linear projector (no VIB σ head llama_proj_std, no prior "
                              "mu_p/std_p) but the config asks for VIB (model.mm_projector_type: vib); export it "
                              "with --options model.mm_projector_type=linear")
        raise ExportError("model.mm_projector_type is vib but no file holds a trained σ head (give --ckpt, the "
                          "trainable.safetensors of the VIB run); otherwise the σ head and prior would be fresh "
                          "random tensors. To export the mean head alone use --options model.mm_projector_type=linear")
    if cfg.mm_projector_type == "linear" and ckpt_vib:
        raise ExportError(f"{cfg.ckpt} holds a VIB projector (σ head and prior) but the config asks for a linear "
                          "one: export it with --options model.mm_projector_type=vib, so the σ head is kept")


def find_train_config(ckpt: str | None, given: str | None = None) -> tuple[dict | None, str | None]:
    """The resolved training config of the run that wrote `ckpt`: `given`, else the config.json that train.py
    wrote next to it (final/config.json, or the run folder's for a checkpoints/step_N file)."""
    candidates = [Path(given)] if given else []
    if ckpt is not None and not given:
        here = Path(ckpt).resolve().parent
        candidates += [here / "config.json", here.parent / "config.json", here.parent.parent / "config.json"]
    for path in candidates:
        if not path.is_file():
            if given:
                raise ExportError(f"--train-config: file not found: {path}")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path}: not a JSON training config ({err})") from None
        if isinstance(data, dict) and "model" in data and "run" in data:
            return data, str(path)
        if given:
            raise ExportError(f"{path}: not a resolved training config (expected `model` and `run` sections, as "
                              "train.py writes to run.output_dir/config.json)")
    return None, None


def load_export_config(cfg_path: str, options: list[str], ckpt: str | None) -> tuple[DictConfig, dict | None]:
    """(validated model config, eval.vis_processor or None); `ckpt` overrides model.ckpt."""
    from minigpt4.common.config_files import eval_extras, load_model_config

    options = list(options)
    if ckpt is not None:
        options.append(f"model.ckpt={ckpt}")
    cfg = load_model_config(cfg_path, options)
    vis_processor, _ = eval_extras(cfg_path)
    return cfg, vis_processor


@dataclass
class ExportPlan:
    """What an export will write, checked, before anything is built: the model config and the formats."""

    cfg: DictConfig
    formats: tuple[str, ...]
    cfg_path: str
    vis_processor: dict | None
    train_config: dict | None
    train_config_path: str | None


def plan_export(cfg_path: str, options: list[str], ckpt: str | None, formats: list[str] | None,
                train_config: str | None = None) -> ExportPlan:
    """Config -> checks, without building the model. Raises ExportError / ConfigError / CheckpointError."""
    cfg, vis_processor = load_export_config(cfg_path, options, ckpt)
    chosen = choose_formats(cfg, formats)
    check_weight_sources(cfg, chosen)
    check_projector_file(cfg)
    train, train_path = find_train_config(cfg.ckpt, train_config)
    if train is not None:
        trained_kind = (train.get("model") or {}).get("mm_projector_type")
        if trained_kind not in (None, cfg.mm_projector_type):
            raise ExportError(f"{train_path} trained a {trained_kind} projector but the config asks for "
                              f"{cfg.mm_projector_type}; use the config of that run")
    return ExportPlan(cfg, chosen, cfg_path, vis_processor, train, train_path)


def build_source(plan: ExportPlan) -> ExportSource:
    """The planned model, built on the CPU."""
    from minigpt4.models.from_config import build_model

    cfg = plan.cfg
    log.info("building %s (%s projector) on the CPU for export", cfg.arch, cfg.mm_projector_type)
    model = build_model(cfg, device="cpu").eval()
    return ExportSource(cfg, model, plan.cfg_path, plan.train_config, plan.train_config_path, plan.vis_processor)
