"""The loading steps both architectures' builders share (models/from_config.py: MiniGPT-4, models/llava.py:
LLaVA-1.5): the tokenizer, a random-init transformers model in its dtype, and the model's weights after
building (a whole-model file, a released projector, this project's trainable file). Also which `model.` keys
name weight files, for provenance.json and the evaluation fingerprints (`files_to_record`).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from minigpt4.common.config import ConfigError
from minigpt4.common.jsonfiles import DataFileError, read_json
from minigpt4.models import checkpoints as ckpt
from minigpt4.models.precision import built_in

log = logging.getLogger(__name__)

# Model config keys that name weights (and the tokenizer, which decides every token id), in the order
# provenance.json lists them.
WEIGHT_KEYS = ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path", "llm_path", "tokenizer_path",
               "projector_path", "llava_path", "ckpt", "full_ckpt", "cnn_path")
# The JSON files of a tokenizer folder that transformers reads as objects (tokenizer.json is checked whole).
_TOKENIZER_JSON_OBJECTS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def files_to_record(model_cfg: Mapping[str, Any] | None) -> dict[str, str]:
    """`model.<key>` -> path of every weight source (and tokenizer) the `model:` section names."""
    if not isinstance(model_cfg, Mapping):
        return {}
    return {f"model.{key}": str(model_cfg[key]) for key in WEIGHT_KEYS if model_cfg.get(key)}


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _check_tokenizer_file(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.tokenizer_path / llm_path: cannot load a tokenizer from {path}: {err}") from None


def _check_tokenizer_file(path: str) -> None:
    """A tokenizer folder whose JSON files are valid JSON but not what transformers expects (a tokenizer.json
    that is not a tokenizer, a tokenizer_config.json that is a list) fails inside transformers with a bare
    KeyError or AttributeError: read them first. The tokenizers library's own parser says what is wrong."""
    from tokenizers import Tokenizer

    where = "model.tokenizer_path / llm_path"
    contents = {}
    for name in _TOKENIZER_JSON_OBJECTS:
        file = os.path.join(path, name)
        if os.path.lexists(file):
            try:
                contents[name] = read_json(file)
            except DataFileError as err:
                raise ConfigError(f"{where}: {err}") from None
            if not isinstance(contents[name], dict):
                raise ConfigError(f"{where}: {file}: expected a JSON object, got {type(contents[name]).__name__}")
    file = os.path.join(path, "tokenizer.json")
    if "tokenizer.json" in contents:  # absent in a slow (sentencepiece) tokenizer folder
        if "model" not in contents["tokenizer.json"]:
            raise ConfigError(f"{where}: {file} is not a Hugging Face tokenizer file (no 'model' entry)")
        try:
            Tokenizer.from_file(file)
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for every parse error
            raise ConfigError(f"{where}: {file} is not a Hugging Face tokenizer file ({err})") from None


# ------------------------------------------------------------------------------------------ random weights


def random_init(model_class, config, dtype: torch.dtype, device: torch.device):
    """A transformers model with random weights, materialised once, in `dtype`, on `device`: built on the meta
    device, given storage there (`to_empty`) and initialised by transformers' own `init_weights` (buffers such as
    RoPE's fp32 inv_freq included). Built directly, every weight would be drawn twice (the torch layers' own
    resets, then transformers' init over them: twice the random-number work, most of a 7B build's time on a CPU)
    and, built in fp32 and cast, held twice for a moment (27 GB for the 7B LLM)."""
    with torch.device("meta"), built_in(dtype):
        model = model_class(config)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


@contextmanager
def drawing_from(rng_state: torch.Tensor) -> Iterator[None]:
    """Run a block with torch's CPU generator at `rng_state` (one taken with `torch.get_rng_state()`), then put
    the generator back where it was.

    The builders build the projector (the only part that trains, and whose fresh tensors a fine-tune starts
    from: the VIB's σ head and prior) drawing from the state the build started in, as if it were built first.
    Its initial values then depend on the seed alone, not on how many random numbers the encoder's and the LLM's
    random init happened to draw before it: those change with their sizes, with transformers' init code and with
    how we materialise them (meta device, issue 16), and the weights they draw are often overwritten by a
    checkpoint anyway. The projector is built on the CPU, so the CPU generator is the one that matters."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        yield


# ------------------------------------------------------------------------------------ weights after building


def load_model_weights(model: nn.Module, cfg, load_projector: Callable) -> None:
    """Whole-model file, then the released projector (read by `load_projector` into the μ head: MiniGPT-4's or
    LLaVA's reader in released_weights.py), then our own fine-tuned projector; later ones win."""
    if cfg.full_ckpt is not None:
        load_full_checkpoint(model, cfg.full_ckpt)
    if cfg.projector_path is not None:
        load_projector(model.projector.llama_proj, cfg.projector_path, llm_hidden=model.llm.config.hidden_size)
    if cfg.ckpt is not None:
        ckpt.load_trainable(model, cfg.ckpt)


def load_full_checkpoint(model: nn.Module, path: str) -> None:
    """A whole-model safetensors (encoder.*, llm.*, projector.*), loaded strictly part by part.

    A linear model's file may seed a VIB model: its `projector.llama_proj.*` becomes the VIB mean head and
    only the VIB's new tensors (std head, prior) keep their fresh initialisation.
    """
    state = ckpt.load_state_file(path)
    parts = {"encoder": model.encoder, "llm": model.llm, "projector": model.projector}
    unknown = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if unknown:
        raise ckpt.CheckpointError(f"{path}: unexpected keys outside encoder/llm/projector: {unknown[:5]}")
    for prefix, module in parts.items():
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        mean_only = {k for k in sub} == {"llama_proj.weight", "llama_proj.bias"}
        if prefix == "projector" and mean_only and hasattr(module, "llama_proj_std"):
            log.info("%s: linear projector loaded as the VIB mean head; std head and prior start fresh", path)
            module, sub = module.llama_proj, {k.split(".", 1)[1]: v for k, v in sub.items()}
        ckpt.load_strict(module, sub, what=f"{prefix} (whole-model checkpoint)", source=path)
