"""LLaVA-1.5 with the VIB projector: frozen CLIP ViT-L/14-336 -> trainable projector -> frozen Vicuna-7B v1.5.

The paper's second architecture, on the same recipes and harness as MiniGPT-4. Everything after the vision
features (splicing visual tokens into the `<ImageHere>` slots, the S-sample repetition, the loss, batched
generation) is MiniGPT-4's: `Llava15` subclasses `MiniGPT4`. What differs:

* the encoder: CLIP's penultimate layer (`vision_feature_layer` -2) without the CLS token, i.e. 576 patch tokens
  of width 1024 for a 336-px image (`LlavaVisionEncoder`);
* the projector's mean head is LLaVA's 2-layer GELU MLP (1024 -> 4096 -> 4096), kept as transformers'
  `LlavaMultiModalProjector` so llava-hf weights fit unchanged; the std head is a fresh copy of it
  (`vib.std_head: same`) or a single Linear (`linear`); softplus is applied by `VIBProjector`;
* the prompt: "USER: <image>\\n{prompt} ASSISTANT:" (template `llava15`, end string "</s>");
* the similarity entropy runs over the tokenizer's base vocabulary (see `Llava15.embed_weight`).

Weights come from one local llava-hf folder (`model.llava_path`, e.g. a copy of llava-hf/llava-1.5-7b-hf),
loaded with `local_files_only=True` and strictly; without it a random model is built from config sizes (tests,
`--device meta` summaries).
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from minigpt4.common.config import ConfigError
from minigpt4.conversation.templates import Template, get_template
from minigpt4.models import checkpoints as ckpt
from minigpt4.models import released_weights
from minigpt4.models.loading import drawing_from, load_model_weights, load_tokenizer, random_init
from minigpt4.models.minigpt4 import MiniGPT4
from minigpt4.models.precision import place_encoder, plan_precision
from minigpt4.models.vib import build_projector

log = logging.getLogger(__name__)

# openai/clip-vit-large-patch14-336 as LLaVA-1.5 uses it (the sizes llava-hf's config.json gives).
CLIP_VIT_L_336: dict = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
# Random-init sizes of the Vicuna v1.5 LLMs as llava-hf ships them (vocabulary padded from 32,000 to 32,064).
LLAVA_LLM_PRESETS: dict[str, dict] = {
    "vicuna-7b-v1.5": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "vicuna-13b-v1.5": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                            num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


# ------------------------------------------------------------------------------------------------ prompt


# The "llava15" template lives in minigpt4/conversation/templates.py with the others.


# ----------------------------------------------------------------------------------------------- encoder


class LlavaVisionEncoder(nn.Module):
    """pixels [B, 3, 336, 336] -> CLIP patch features [B, 576, 1024] exactly as LLaVA-1.5 selects them:
    the hidden states of one layer (default -2, the penultimate), CLS dropped ("default" strategy)."""

    def __init__(self, vision_tower: PreTrainedModel, *, feature_layer: int = -2, select_strategy: str = "default"):
        super().__init__()
        if not isinstance(feature_layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index (LLaVA-1.5 uses -2), got {feature_layer!r}")
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
        self.vision_tower = vision_tower
        self.feature_layer = feature_layer
        self.drop_cls = select_strategy == "default"
        self.train(False)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def num_query_tokens(self) -> int:
        """Image slots in the prompt: one per patch (plus CLS with the "full" strategy)."""
        patches = (self.config.image_size // self.config.patch_size) ** 2
        return patches if self.drop_cls else patches + 1

    @property
    def out_dim(self) -> int:
        return self.config.hidden_size

    def train(self, mode: bool = True) -> "LlavaVisionEncoder":
        return super().train(False)  # frozen: always eval

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [B, 3, {size}, {size}] for this CLIP tower, got "
                             f"{tuple(pixel_values.shape)}; use the clip_image_eval / clip_image_train processors "
                             f"with image_size {size}")
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        return features[:, 1:] if self.drop_cls else features


# ------------------------------------------------------------------------------------------------- model


class Llava15(MiniGPT4):
    """MiniGPT-4's wrapper around LLaVA-1.5's parts (see the module docstring)."""

    def __init__(self, encoder: LlavaVisionEncoder, projector: nn.Module, llm: nn.Module, tokenizer,
                 template: Template, *, entropy_vocab_size: int | None = None, **kwargs):
        super().__init__(encoder, projector, llm, tokenizer, template, **kwargs)
        rows = llm.get_input_embeddings().weight.shape[0]
        self.entropy_vocab_size = rows if entropy_vocab_size is None else min(entropy_vocab_size, rows)

    @property
    def embed_weight(self) -> torch.Tensor:
        """The embedding rows of real vocabulary entries. llava-hf appends `<image>`, `<pad>` and padding rows
        (32,000 -> 32,064) that the original LLaVA release, on which the reference ran, does not have; they would
        enter the similarity softmax and log V."""
        return self.llm.get_input_embeddings().weight[: self.entropy_vocab_size]


def split_llava(hf: LlavaForConditionalGeneration) -> tuple[LlavaVisionEncoder, nn.Module, nn.Module]:
    """(vision encoder, projector MLP, causal LM) sharing the modules of a transformers LLaVA model.

    The LLM is the text config's causal-LM class with LLaVA's language model and LM head moved in, so it has
    the usual `forward(inputs_embeds, labels)` / `generate` and nothing of the vision side.
    """
    cfg = hf.config
    encoder = LlavaVisionEncoder(hf.model.vision_tower, feature_layer=cfg.vision_feature_layer,
                                 select_strategy=cfg.vision_feature_select_strategy)
    with torch.device("meta"):  # a shell: its own (meta) decoder and head are replaced below
        llm = AutoModelForCausalLM.from_config(cfg.text_config)
    llm.model = hf.model.language_model
    llm.lm_head = hf.lm_head
    llm.generation_config = hf.generation_config
    return encoder, hf.model.multi_modal_projector, llm


# ----------------------------------------------------------------------------------------------- builder


def _checked_overrides(given: dict, config_cls: type, key: str) -> dict:
    allowed = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"model.{key}: unknown keys {unknown} for {config_cls.__name__}")
    return given


def llava_config_from(cfg: DictConfig, tokenizer) -> LlavaConfig:
    """Random-init LLaVA sizes: CLIP ViT-L/14-336 + `model.vision`, an LLM preset + `model.llm`."""
    vision = {**CLIP_VIT_L_336, **_checked_overrides(OmegaConf.to_container(cfg.vision), CLIPVisionConfig, "vision")}
    if cfg.llm_preset is not None and cfg.llm_preset not in LLAVA_LLM_PRESETS:
        raise ConfigError(f"model.llm_preset = {cfg.llm_preset!r}; for llava15 expected one of "
                          f"{', '.join(LLAVA_LLM_PRESETS)}")
    text = {**LLAVA_LLM_PRESETS.get(cfg.llm_preset, {}),
            **_checked_overrides(OmegaConf.to_container(cfg.llm), LlamaConfig, "llm")}
    if tokenizer is not None:
        text.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text.setdefault(name, getattr(tokenizer, name))
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text))
    config._attn_implementation = cfg.attn_implementation  # also sets the vision and text sub-configs
    return config


def _check_against_folder(cfg: DictConfig, config: LlavaConfig) -> None:
    """`model.vision` / `model.llm` given with a llava_path must agree with the folder's config.json."""
    for key, sub in (("vision", config.vision_config), ("llm", config.text_config)):
        for name, value in OmegaConf.to_container(cfg[key]).items():
            if getattr(sub, name, None) != value:
                raise ConfigError(f"model.{key}.{name} = {value!r} but {cfg.llava_path}/config.json has "
                                  f"{getattr(sub, name, None)!r}; drop the override (sizes come from the folder)")


def load_llava_folder(path: str, *, dtype: torch.dtype, attn_implementation: str) -> LlavaForConditionalGeneration:
    """The whole llava-hf model from a local folder; any missing, unexpected or mis-shaped tensor is an error
    (transformers would otherwise initialise missing ones randomly and only warn)."""
    released_weights.read_llava_folder_config(path)
    log.info("loading LLaVA-1.5 from %s", path)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        details = "; ".join(f"{k}: {ckpt.key_listing(sorted(map(str, v)))}" for k, v in problems.items())
        raise ckpt.CheckpointError(f"{path}: the weights do not match config.json: {details}")
    return model


def build_llava_projector(cfg: DictConfig, mean_head: nn.Module, config: LlavaConfig) -> nn.Module:
    """`linear`: LLaVA's MLP itself; `vib`: VIBProjector with that MLP as μ head and a fresh σ head."""
    vision_width, llm_width = config.vision_config.hidden_size, config.text_config.hidden_size
    std_head = None
    if cfg.mm_projector_type == "vib" and cfg.vib.std_head == "same":
        std_head = LlavaMultiModalProjector(config)
    elif cfg.mm_projector_type == "vib":
        std_head = nn.Linear(vision_width, llm_width)
    return build_projector(cfg.mm_projector_type, vision_width, llm_width, OmegaConf.to_object(cfg.vib),
                           mean_head=mean_head, std_head=std_head)


def build_llava15(cfg: DictConfig, device: torch.device) -> Llava15:
    meta = device.type == "meta"
    start_rng = torch.get_rng_state()  # the projector draws from here, as if built first (loading.drawing_from)
    tokenizer = None
    if not meta:
        tok_path = cfg.tokenizer_path or cfg.llava_path
        if tok_path is None:
            raise ConfigError("model.llava_path (or model.tokenizer_path) is required to build a usable LLaVA model")
        tokenizer = load_tokenizer(tok_path)
    if not cfg.prompt_template.startswith("llava"):
        log.warning("model.prompt_template = %r with model.arch = llava15; LLaVA-1.5 was trained on 'llava15'",
                    cfg.prompt_template)
    precision = plan_precision(cfg, device)  # auto, fp32 or bf16 (reference is MiniGPT-4's; refused in config)
    llm_dtype = precision.llm
    if cfg.llava_path is not None and not meta:
        hf = load_llava_folder(cfg.llava_path, dtype=llm_dtype, attn_implementation=cfg.attn_implementation)
        _check_against_folder(cfg, hf.config)
    else:
        if cfg.llava_path is not None:  # meta: the folder's exact sizes, no weights read
            released_weights.read_llava_folder_config(cfg.llava_path)
            config = LlavaConfig.from_pretrained(cfg.llava_path, local_files_only=True)
            _check_against_folder(cfg, config)
        else:
            config = llava_config_from(cfg, tokenizer)
        hf = random_init(LlavaForConditionalGeneration, config, llm_dtype, device)
        if not meta:
            log.warning("model.llava_path is not set: LLaVA is randomly initialised (LLM width %d, %d layers)",
                        config.text_config.hidden_size, config.text_config.num_hidden_layers)
    encoder, mlp, llm = split_llava(hf)
    with torch.device("meta") if meta else nullcontext(), drawing_from(start_rng):
        projector = build_llava_projector(cfg, mlp, hf.config)
    template = get_template(cfg.prompt_template)
    if meta:  # dtypes only, as the real build places them: a meta model reports the plan's dtypes
        place_encoder(encoder, precision, device)
        projector.to(dtype=torch.float32)
        return Llava15(encoder, projector, llm, None, template, end_sym=cfg.end_sym)

    place_encoder(encoder, precision, device)
    llm.to(device)
    projector.to(device=device, dtype=torch.float32)  # trainable: fp32 master weights, autocast does the rest
    model = Llava15(
        encoder, projector, llm, tokenizer, template, entropy_vocab_size=tokenizer.vocab_size,
        end_sym=cfg.end_sym, max_txt_len=cfg.max_txt_len,
    )
    if model.entropy_vocab_size != model.llm.get_input_embeddings().weight.shape[0]:
        log.info("VIB similarity entropy over the tokenizer's %d base tokens (of %d embedding rows)",
                 model.entropy_vocab_size, model.llm.get_input_embeddings().weight.shape[0])
    load_model_weights(model, cfg, load_projector=released_weights.load_llava_projector)
    return model


