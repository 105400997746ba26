"""Config -> model. Loads every weight from local paths only, strictly, and says which file was used."""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from minigpt4.common.config import PATH_KEYS, ConfigError
from minigpt4.common.files import NotRegularFileError, require_regular_file, require_regular_files_in
from minigpt4.conversation.templates import get_template
from minigpt4.models import released_weights
from minigpt4.models.cnn_encoder import CNNGridEncoder, load_cnn_folder
from minigpt4.models.encoders import ImageEncoder, PatchConcatEncoder
from minigpt4.models.llava import build_llava15
from minigpt4.models.loading import drawing_from, load_model_weights, load_tokenizer, random_init
from minigpt4.models.minigpt4 import MiniGPT4
from minigpt4.models.numerics import refuse_nonfinite_weights
from minigpt4.models.precision import built_in, place_encoder, plan_precision
from minigpt4.models.vib import build_projector

log = logging.getLogger(__name__)

# Random-init sizes of the LLMs MiniGPT-4 was released with (the real weights come from llm_path).
LLM_PRESETS: dict[str, dict] = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "vicuna-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def build_model(cfg: DictConfig | dict, *, device: str | torch.device = "cpu"):
    """Build the model named by `cfg.arch` on `device` ("meta" builds shapes only, no memory, no weights)."""
    if not isinstance(cfg, DictConfig):
        from minigpt4.common.config import ModelConfig, merge

        cfg = merge(ModelConfig, cfg, where="model")
    device = torch.device(device)
    if device.type == "meta":
        return architecture_builder(cfg.arch)(cfg, device)
    check_weight_paths(cfg)
    model = architecture_builder(cfg.arch)(cfg, device)
    # After every load and cast: a float64 1e300 is finite in its file and inf in the fp32 model.
    refuse_nonfinite_weights(model, weight_sources(cfg))
    return model


def check_weight_paths(cfg: DictConfig) -> None:
    """Every weight / tokenizer path is a regular file or a folder of regular files (a FIFO or a link to
    /dev/zero among them would block transformers or the readers here forever)."""
    for key in PATH_KEYS:
        path = cfg.get(key)
        try:
            if path is not None and os.path.isdir(path):
                require_regular_files_in(path, f"file in model.{key}")
            elif path is not None:
                require_regular_file(path, f"model.{key}")
        except NotRegularFileError as err:
            raise ConfigError(str(err)) from None


def weight_sources(cfg: DictConfig) -> dict[str, str]:
    """{top-level module: where its weights came from}, for messages about them (later sources win)."""
    sources = {"encoder": ("encoder_path", "blip2_hf_path", "vit_path", "llava_path", "cnn_path"),
               "llm": ("llm_path", "llava_path"),
               "projector": ("projector_path", "ckpt", "llava_path")}
    named = {}
    for part, keys in sources.items():
        given = [f"model.{k} = {cfg.get(k)}" for k in keys if cfg.get(k) is not None]
        if cfg.get("full_ckpt") is not None:
            given.insert(0, f"model.full_ckpt = {cfg.full_ckpt}")
        named[part] = ", ".join(given) if given else "random initialisation"
    return named


def build_llm(cfg: DictConfig, tokenizer, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.llm_path is not None:
        kwargs = dict(local_files_only=True, dtype=dtype, attn_implementation=cfg.attn_implementation)
        if cfg.low_resource:
            from transformers import BitsAndBytesConfig

            if device.type != "cuda":
                raise ConfigError("model.low_resource (8-bit LLM) needs a CUDA GPU")
            kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
        log.info("loading LLM from %s", cfg.llm_path)
        return LlamaForCausalLM.from_pretrained(cfg.llm_path, **kwargs)
    if cfg.low_resource and device.type != "meta":
        raise ConfigError("model.low_resource loads the LLM in 8 bits from model.llm_path; set model.llm_path "
                          "(a random-init LLM cannot be quantized on load)")
    if cfg.llm_preset is not None and cfg.llm_preset not in LLM_PRESETS:
        raise ConfigError(f"model.llm_preset = {cfg.llm_preset!r}; expected one of {', '.join(LLM_PRESETS)}")
    sizes = dict(LLM_PRESETS.get(cfg.llm_preset, {}))
    sizes.update(OmegaConf.to_container(cfg.llm, resolve=True))
    if tokenizer is not None:
        sizes.setdefault("vocab_size", len(tokenizer))
        sizes.setdefault("bos_token_id", tokenizer.bos_token_id)
        sizes.setdefault("eos_token_id", tokenizer.eos_token_id)
        sizes.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = LlamaConfig(**sizes)
    config._attn_implementation = cfg.attn_implementation
    if device.type != "meta" and cfg.full_ckpt is None:  # with full_ckpt the weights arrive after building
        log.warning("model.llm_path is not set: the LLM is randomly initialised (%d layers, width %d)",
                    config.num_hidden_layers, config.hidden_size)
    return random_init(LlamaForCausalLM, config, dtype, device)


def build_encoder(cfg: DictConfig) -> ImageEncoder | PatchConcatEncoder | CNNGridEncoder:
    """`model.visual_tokens`: the Q-Former encoder, MiniGPT-4's Llama-2 variant (4 patch tokens concatenated), or
    a pretrained CNN's feature map (cnn_grid: no attention, so no attn_implementation)."""
    if cfg.visual_tokens == "cnn_grid":
        return CNNGridEncoder(OmegaConf.to_container(cfg.vision, resolve=True), group=cfg.grid_group)
    attn = {"attn_implementation": cfg.attn_implementation}
    vision = {**attn, **OmegaConf.to_container(cfg.vision, resolve=True)}
    if cfg.visual_tokens == "vit_patch4":
        return PatchConcatEncoder(vision, group=4)
    return ImageEncoder(vision, {**attn, **OmegaConf.to_container(cfg.qformer, resolve=True)},
                        num_query_tokens=cfg.num_query_tokens)


def load_encoder(encoder: ImageEncoder | PatchConcatEncoder | CNNGridEncoder, cfg: DictConfig) -> None:
    """Encoder weights from the first of encoder_path / blip2_hf_path / vit_path+qformer_path that is set
    (vit_patch4: vit_path alone); the encoder was built on the meta device, so the tensors are assigned
    (strictly), not copied."""
    if cfg.visual_tokens == "cnn_grid":
        if cfg.cnn_path is not None:
            load_cnn_folder(encoder, cfg.cnn_path, assign=True)
        elif cfg.full_ckpt is None:
            log.warning("model.cnn_path is not set: the CNN encoder is randomly initialised")
    elif cfg.visual_tokens == "vit_patch4" and cfg.vit_path is not None:
        released_weights.load_lavis_vit_without_qformer(encoder, cfg.vit_path, assign=True)
    elif cfg.encoder_path is not None:
        released_weights.load_encoder_weights(encoder, cfg.encoder_path, assign=True)
    elif cfg.blip2_hf_path is not None:
        released_weights.load_hf_blip2_snapshot(encoder, cfg.blip2_hf_path, assign=True)
    elif cfg.vit_path is not None:
        released_weights.load_lavis_encoder(encoder, cfg.vit_path, cfg.qformer_path, assign=True)
    elif cfg.full_ckpt is None:
        log.warning("no encoder weights given (encoder_path / blip2_hf_path / vit_path+qformer_path): "
                    "the ViT and Q-Former are randomly initialised")


def build_minigpt4(cfg: DictConfig, device: torch.device) -> MiniGPT4:
    meta = device.type == "meta"
    start_rng = torch.get_rng_state()  # the projector draws from here, as if built first (loading.drawing_from)
    tokenizer = None
    tok_path = cfg.tokenizer_path or cfg.llm_path
    if tok_path is not None and not meta:
        tokenizer = load_tokenizer(tok_path)
    elif not meta:
        raise ConfigError("model.tokenizer_path (or model.llm_path) is required to build a usable model")
    # encoder_device: cpu (low-resource runs) keeps the 1 B-parameter ViT off a small GPU (fp32 there).
    enc_device = torch.device("cpu") if cfg.encoder_device == "cpu" and not meta else device
    precision = plan_precision(cfg, device, enc_device)
    # The ~1.1 B-parameter encoder is built on the meta device. With its weights on disk the strict loader
    # assigns the checkpoint tensors (no random init that would be overwritten anyway); without, it is
    # materialised once, on its device and in its dtype, and drawn once by transformers' init (as the LLM:
    # loading.random_init), not first by torch's own layer resets.
    encoder_from_file = any(cfg[k] is not None for k in ("encoder_path", "blip2_hf_path", "vit_path", "cnn_path"))
    with torch.device("meta"), built_in(precision.encoder):
        encoder = build_encoder(cfg)
    if not meta and not encoder_from_file:
        encoder.to_empty(device=enc_device)
        encoder.init_random_weights()
    with torch.device("meta") if meta else nullcontext():
        llm = build_llm(cfg, tokenizer, device, precision.llm)
        with drawing_from(start_rng):
            projector = build_projector(cfg.mm_projector_type, encoder.out_dim, llm.config.hidden_size,
                                        OmegaConf.to_object(cfg.vib))
    if meta:
        place_encoder(encoder, precision, device)  # dtypes only: a meta model reports the plan's dtypes
        return MiniGPT4(encoder, projector, llm, None, get_template(cfg.prompt_template), end_sym=cfg.end_sym,
                        autocast_dtype=precision.autocast)
    load_encoder(encoder, cfg)
    place_encoder(encoder, precision, enc_device)
    if not cfg.low_resource:
        llm.to(device)
    projector.to(device=device, dtype=torch.float32)  # trainable: fp32 master weights; autocast does the matmuls
    model = MiniGPT4(
        encoder, projector, llm, tokenizer, get_template(cfg.prompt_template),
        end_sym=cfg.end_sym, max_txt_len=cfg.max_txt_len, autocast_dtype=precision.autocast,
    )
    load_model_weights(model, cfg, load_projector=released_weights.load_minigpt4_projector)
    return model


# `model.arch` -> the builder of that architecture.
ARCHITECTURES: dict[str, Callable[[DictConfig, torch.device], MiniGPT4]] = {
    "minigpt4": build_minigpt4,
    "llava15": build_llava15,
}


def architecture_builder(arch: str) -> Callable[[DictConfig, torch.device], MiniGPT4]:
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown model arch {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]
