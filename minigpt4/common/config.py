"""Typed configuration: omegaconf structured configs merged in one documented order, validated early.

Merge order (later wins): schema defaults (model, run, eval) < dataset builder defaults < the recipe YAML
< `--options key=value ...` from the command line. Structured configs make unknown keys and wrong types
errors that name the key; `check_paths` then verifies every weight/data path exists — all before any model
is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


@dataclass
class VIBConfig:
    num_samples: int = 3  # S noise samples per image in training (reference 3)
    beta: float = 1e-7  # KL weight (reference 1e-7)
    adaptive: bool = True  # AdaVIB: weight each image's KL by α = -log(H / log V)
    kl_on: str = "pooled"  # pooled (reference) | token
    reparameterize: bool = True  # false: z = μ in training, KL kept (ablation)
    std_head: str = "same"  # LLaVA only: same (MLP like the mean head) | linear


@dataclass
class ModelConfig:
    arch: str = "minigpt4"  # minigpt4 | llava15
    # --- weights (local paths only; all null = random init, how tests build tiny models) ---
    encoder_path: Optional[str] = None  # converted encoder.safetensors (scripts/convert_lavis_checkpoint.py)
    vit_path: Optional[str] = None  # LAVIS eva_vit_g.pth
    qformer_path: Optional[str] = None  # LAVIS blip2_pretrained_flant5xxl.pth
    blip2_hf_path: Optional[str] = None  # local Hugging Face BLIP-2 snapshot folder (vision, Q-Former, queries)
    llm_path: Optional[str] = None  # Vicuna / Llama-2 folder in Hugging Face format
    tokenizer_path: Optional[str] = None  # defaults to llm_path
    projector_path: Optional[str] = None  # MiniGPT-4 projector, e.g. prerained_minigpt4_7b.pth; llava15: the μ head
    #   from an original-release mm_projector.bin or a llava-hf folder (overrides the one in llava_path)
    llava_path: Optional[str] = None  # llava15: local llava-hf folder (CLIP tower, projector, Vicuna-1.5, tokenizer)
    ckpt: Optional[str] = None  # this project's trainable.safetensors (fine-tuned projector)
    full_ckpt: Optional[str] = None  # whole-model safetensors (the embedded tiny shapes-world model)
    # --- architecture (used for random init and checked against loaded weights) ---
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of encoders.EVA_VIT_G (llava15: CLIP_VIT_L_336)
    qformer: dict[str, Any] = field(default_factory=dict)  # overrides of encoders.QFORMER_BASE
    llm_preset: Optional[str] = None  # vicuna-7b | vicuna-13b | llama2-7b | llama2-13b (random init sizes);
    #   llava15: vicuna-7b-v1.5 | vicuna-13b-v1.5
    llm: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides for random init
    num_query_tokens: int = 32
    # --- the method ---
    mm_projector_type: str = "vib"  # linear | vib
    vib: VIBConfig = field(default_factory=VIBConfig)
    # --- prompts ---
    prompt_template: str = "vicuna_v0"  # vicuna_v0 | llama2 | plain | llava15 | llava15
    end_sym: Optional[str] = None  # defaults to the template's
    max_txt_len: int = 512
    # --- precision / speed ---
    llm_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    encoder_dtype: str = "auto"  # same choices; LAVIS runs the ViT in fp16 on GPU
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    low_resource: bool = False  # 8-bit LLM via bitsandbytes (GPU only)
    encoder_device: Optional[str] = None  # null: with the LLM; cpu: ViT + Q-Former on the CPU (24 GB cards)


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
PATH_KEYS = ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path", "llm_path", "tokenizer_path",
             "projector_path", "ckpt", "full_ckpt", "llava_path")
# Weight sources that only one architecture reads: set for the other one, they would be silently unused.
MINIGPT4_ONLY_KEYS = ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path", "llm_path")
LLAVA_ONLY_KEYS = ("llava_path",)


def merge(schema: Any, *layers: Any, options: list[str] | None = None, where: str = "config",
          allow_missing: bool = False) -> DictConfig:
    """schema defaults < layers (dicts, DictConfigs or YAML paths) < dotlist options; unknown keys and wrong
    types raise ConfigError naming the key and, for unknown keys, the valid ones.

    A `???` left in the layers (a path the user must supply) is an error naming every such key, unless
    `allow_missing` (shape-only tools). It is checked on the layers themselves: merging `???` into a schema
    field that has a default would silently keep the default.
    """
    cfg = OmegaConf.structured(schema)
    plain = OmegaConf.create()
    try:
        for layer in layers:
            if isinstance(layer, (str, os.PathLike)):
                if not os.path.isfile(layer):
                    raise ConfigError(f"config file not found: {layer}")
                layer = OmegaConf.load(layer)
            cfg = OmegaConf.merge(cfg, layer)
            plain = OmegaConf.merge(plain, layer)
        if options:
            dotlist = OmegaConf.from_dotlist(list(options))
            cfg = OmegaConf.merge(cfg, dotlist)
            plain = OmegaConf.merge(plain, dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, cfg, where)) from None
    missing = sorted(OmegaConf.missing_keys(plain) | OmegaConf.missing_keys(cfg))
    if missing and not allow_missing:
        raise ConfigError(f"{where}: these keys must be set (e.g. --options {missing[0]}=...): {', '.join(missing)}")
    for key in missing:  # allow_missing: shape-only use, the value does not matter
        OmegaConf.update(cfg, key, None, force_add=True)
    return cfg


def _explain(err: OmegaConfBaseException, cfg: DictConfig, where: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"{where}: unknown key '{key}'" + (f"; valid keys here: {', '.join(map(str, valid))}" if valid else "")
    return f"{where}: bad value for '{key}': {msg}"


def validate_model_config(model: DictConfig, *, check_files: bool = True) -> None:
    """Semantic checks that types alone cannot express; raises ConfigError naming the key."""
    choices = {
        "mm_projector_type": ("linear", "vib"),
        "vib.kl_on": ("pooled", "token"),
        "vib.std_head": ("same", "linear"),
        "llm_dtype": DTYPE_CHOICES,
        "encoder_dtype": DTYPE_CHOICES,
        "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
        "prompt_template": ("vicuna_v0", "llama2", "plain", "llava15"),
        "arch": ("minigpt4", "llava15"),
    }
    for key, valid in choices.items():
        value = OmegaConf.select(model, key)
        if value not in valid:
            raise ConfigError(f"model.{key} = {value!r}; expected one of {', '.join(valid)}")
    for key in ("max_txt_len", "num_query_tokens"):  # 0 would leave no answer token / no visual token
        if model[key] < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {model[key]}")
    if model.encoder_device not in (None, "cpu"):
        raise ConfigError(f"model.encoder_device = {model.encoder_device!r}; expected null (with the LLM) or cpu")
    if model.vib.num_samples < 1:
        raise ConfigError(f"model.vib.num_samples must be >= 1, got {model.vib.num_samples}")
    if model.vib.beta < 0:
        raise ConfigError(f"model.vib.beta must be >= 0, got {model.vib.beta}")
    if (model.vit_path is None) != (model.qformer_path is None):
        raise ConfigError("model.vit_path and model.qformer_path come together (LAVIS ViT + BLIP-2 Q-Former); "
                          "set both, or use model.encoder_path / model.blip2_hf_path")
    check_arch_keys(model)
    if check_files:
        check_paths(model, PATH_KEYS, prefix="model")


def check_arch_keys(model: DictConfig) -> None:
    """A weight path the chosen architecture never reads is a mistake (a wrong recipe), not a no-op."""
    unused = MINIGPT4_ONLY_KEYS if model.arch == "llava15" else LLAVA_ONLY_KEYS
    for key in unused:
        if model.get(key) is not None:
            hint = ("LLaVA-1.5 takes its CLIP tower, projector, LLM and tokenizer from model.llava_path"
                    if model.arch == "llava15" else "model.llava_path is for model.arch: llava15")
            raise ConfigError(f"model.{key} is not used by model.arch = {model.arch!r}; {hint}")
    if model.arch == "llava15" and model.low_resource:
        raise ConfigError("model.low_resource (8-bit LLM) is not supported for model.arch = 'llava15'")
    if model.arch == "llava15" and model.encoder_device is not None:
        raise ConfigError("model.encoder_device is not supported for model.arch = 'llava15'")


def check_paths(node: DictConfig, keys: tuple[str, ...], *, prefix: str) -> None:
    for key in keys:
        path = node.get(key)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"{prefix}.{key}: path not found: {path}")
