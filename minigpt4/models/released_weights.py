"""Released checkpoints of other projects -> this model's keys, strictly (see checkpoints.py for the rules).

* LAVIS `eva_vit_g.pth` (EVA ViT, 40 blocks) and `blip2_pretrained_*.pth` ({"model": {Qformer.bert.*, ...}})
  -> `convert_lavis_vit`, `convert_lavis_qformer`, `load_lavis_encoder`;
* a local Hugging Face BLIP-2 snapshot folder -> `load_hf_blip2_snapshot`;
* the converted encoder file written by scripts/convert_lavis_checkpoint.py -> `load_encoder_weights`;
* MiniGPT-4's projector ({"model": {"llama_proj.weight", "llama_proj.bias"}}) -> `load_minigpt4_projector`;
* LLaVA-1.5's 2-layer MLP projector, from an original-release `mm_projector.bin` or a llava-hf folder
  -> `load_llava_projector` (and `read_llava_folder_config` for the folder itself).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig

from minigpt4.models.checkpoints import (
    CheckpointError,
    PathLike,
    check_finite,
    key_listing,
    load_state_file,
    load_strict,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- LAVIS conversion

# (pattern, replacement): replacement None means "known and deliberately not used".
_VIT_RULES: list[tuple[str, str | None]] = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    # EVA-CLIP's final norm and classifier/projection head: BLIP-2 uses the block-39 output instead.
    (r"(norm|fc_norm|head)\.(weight|bias)", None),
]

_QFORMER_LAYER = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_QFORMER_RULES: list[tuple[str, str | None]] = [
    (r"query_tokens", "query_tokens"),
    (r"ln_vision\.(weight|bias)", r"ln_vision.\1"),
    # LAVIS applies its embeddings LayerNorm to the query embeddings; transformers calls it `layernorm`.
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (_QFORMER_LAYER + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (_QFORMER_LAYER + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (_QFORMER_LAYER + r"intermediate_query\.dense\.(weight|bias)",
     r"qformer.encoder.layer.\1.intermediate_query.dense.\2"),
    (_QFORMER_LAYER + r"output_query\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.output_query.\2.\3"),
    # Not used by MiniGPT-4 (query branch only): the text feed-forward, text embeddings, LM head, pooler.
    (_QFORMER_LAYER + r"(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)", None),
    (r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|position_ids)", None),
    (r"Qformer\.bert\.pooler\..+", None),
    (r"Qformer\.cls\..+", None),
    # BLIP-2's language-model side and stage-1 contrastive/matching heads.
    (r"(t5_proj|opt_proj|llm_proj|vision_proj|text_proj|itm_head)\.(weight|bias)", None),
    (r"(t5_model|opt_model|llm_model)\..+", None),
    (r"temp", None),
]


def _apply_rules(
    state: Mapping[str, torch.Tensor], rules: list[tuple[str, str | None]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                if repl is not None:
                    out[pattern.sub(repl, key)] = tensor
                break
        else:
            unknown.append(key)
    return out, unknown


def convert_lavis_vit(state: Mapping[str, torch.Tensor], *, num_blocks: int = 39) -> dict[str, torch.Tensor]:
    """LAVIS/EVA ViT keys -> ImageEncoder `vision_model.*` keys.

    q_bias and v_bias become one qkv bias (the key part has no bias: zeros). Blocks from `num_blocks` on are
    dropped: the checkpoint has 40 blocks and BLIP-2 uses the output of the 39th.
    """
    kept: dict[str, torch.Tensor] = {}
    qv_bias: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        block = re.match(r"blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= num_blocks:
            continue  # the unused last block(s)
        bias = re.fullmatch(r"blocks\.(\d+)\.attn\.([qv])_bias", key)
        if bias:
            qv_bias.setdefault(int(bias.group(1)), {})[bias.group(2)] = tensor
        else:
            kept[key] = tensor
    out, unknown = _apply_rules(kept, _VIT_RULES)
    if unknown:
        raise CheckpointError(
            f"EVA ViT checkpoint has keys this converter does not know (expected LAVIS eva_vit_g layout): "
            f"{key_listing(unknown)}"
        )
    for block, pair in sorted(qv_bias.items()):
        if set(pair) != {"q", "v"}:
            raise CheckpointError(f"EVA ViT checkpoint: block {block} has only {sorted(pair)}_bias, needs q and v")
        q, v = pair["q"], pair["v"]
        out[f"encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    return {f"vision_model.{k}": v for k, v in out.items()}


def convert_lavis_qformer(state: Mapping[str, torch.Tensor], *, num_vit_blocks: int = 39) -> dict[str, torch.Tensor]:
    """LAVIS BLIP-2 keys (Qformer.bert.*, query_tokens, ln_vision.*) -> ImageEncoder keys.

    `visual_encoder.*` tensors, present in some BLIP-2 files, are converted as well (as `vision_model.*`).
    """
    vit = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    rest = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    out, unknown = _apply_rules(rest, _QFORMER_RULES)
    if unknown:
        raise CheckpointError(
            f"BLIP-2 checkpoint has keys this converter does not know (expected LAVIS Qformer.bert.* layout): "
            f"{key_listing(unknown)}"
        )
    if vit:
        out.update(convert_lavis_vit(vit, num_blocks=num_vit_blocks))
    return out


def read_lavis_encoder_state(
    vit_path: PathLike | None, qformer_path: PathLike, *, num_vit_blocks: int = 39
) -> dict[str, torch.Tensor]:
    """Both LAVIS files, converted and merged into ImageEncoder keys."""
    state = convert_lavis_vit(load_state_file(vit_path), num_blocks=num_vit_blocks) if vit_path else {}
    from_qformer = convert_lavis_qformer(load_state_file(qformer_path), num_vit_blocks=num_vit_blocks)
    overridden = [k for k in from_qformer if k in state]
    if overridden:
        # LAVIS loads the BLIP-2 file after the ViT file, so its visual_encoder tensors win; do the same, loudly.
        logger.warning("%s overrides %d ViT tensors from %s", qformer_path, len(overridden), vit_path)
    state.update(from_qformer)
    return state


def load_lavis_encoder(
    encoder: nn.Module, vit_path: PathLike | None, qformer_path: PathLike, *, assign: bool = False
) -> None:
    """Load eva_vit_g.pth + blip2_pretrained_*.pth into an ImageEncoder (strict; see load_strict for assign)."""
    num_blocks = encoder.vision_model.config.num_hidden_layers
    state = read_lavis_encoder_state(vit_path, qformer_path, num_vit_blocks=num_blocks)
    load_strict(encoder, state, what="image encoder (EVA ViT-g + Q-Former)", source=f"{vit_path} + {qformer_path}",
                assign=assign)


def load_lavis_vit_without_qformer(encoder: nn.Module, vit_path: PathLike, *, assign: bool = False) -> None:
    """MiniGPT-4's Llama-2 variant (no Q-Former): eva_vit_g.pth into a PatchConcatEncoder, strictly.

    Its ln_vision is LayerNorm's initial weight 1 / bias 0, never BLIP-2's: with `has_qformer: False` MiniGPT-4
    reads no BLIP-2 file (Vision-CAIR/MiniGPT-4 minigpt4/models/minigpt4.py), keeps ln_vision frozen
    (base_model.py `init_vision_encoder`) and saves only trainable tensors (runners/runner_base.py
    `_save_checkpoint`), so no released file holds another ln_vision.
    """
    state = convert_lavis_vit(load_state_file(vit_path), num_blocks=encoder.vision_model.config.num_hidden_layers)
    width = encoder.ln_vision.normalized_shape[0]
    state.update({"ln_vision.weight": torch.ones(width), "ln_vision.bias": torch.zeros(width)})
    load_strict(encoder, state, what="image encoder (EVA ViT-g, no Q-Former)", source=vit_path, assign=assign)


# ------------------------------------------------------------------------------- Hugging Face BLIP-2 snapshot

_HF_IGNORED = re.compile(
    r"(language_model|language_projection|vision_projection|text_projection|itm_head|qformer\.embeddings)\..+"
    r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.\w+\.(weight|bias)"  # text feed-forward
)
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "qkv_bias", "hidden_act")
_QFORMER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "cross_attention_frequency", "hidden_act")


def check_hf_blip2_config(encoder: nn.Module, folder: PathLike) -> None:
    """CheckpointError unless folder/config.json describes the same ViT / Q-Former shapes as `encoder`."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    if config.get("model_type") != "blip-2":
        raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'blip-2'")
    # Fields the snapshot leaves out take transformers' defaults. Norm eps is not compared: HF uses one eps
    # for the blocks and the final norm, we keep LAVIS's two (1e-6 and ln_vision's 1e-5).
    differences = []
    for section, fields, defaults, ours in (
        ("vision_config", _VISION_FIELDS, Blip2VisionConfig(), encoder.vision_model.config),
        ("qformer_config", _QFORMER_FIELDS, Blip2QFormerConfig(), encoder.qformer.config),
    ):
        given = config.get(section) or {}
        for field in fields:
            theirs = given.get(field, getattr(defaults, field))
            if theirs != getattr(ours, field):
                differences.append(f"{section}.{field}: snapshot {theirs!r}, model {getattr(ours, field)!r}")
    n_query = config.get("num_query_tokens", 32)
    if n_query != encoder.query_tokens.shape[1]:
        differences.append(f"num_query_tokens: snapshot {n_query}, model {encoder.query_tokens.shape[1]}")
    if differences:
        raise CheckpointError(f"{folder}: BLIP-2 snapshot does not match the image encoder config:\n  "
                              + "\n  ".join(differences))


def _hf_target_key(key: str) -> str | None:
    """Snapshot key -> ImageEncoder key, None for known-unused keys; CheckpointError for unknown keys."""
    if key.startswith("vision_model.post_layernorm."):
        return "ln_vision." + key[len("vision_model.post_layernorm."):]  # HF's final norm is LAVIS's ln_vision
    if _HF_IGNORED.fullmatch(key):
        return None
    if key.startswith(("vision_model.", "qformer.")) or key == "query_tokens":
        return key
    raise CheckpointError(f"BLIP-2 snapshot key {key!r} is not a known BLIP-2 tensor")


def read_hf_blip2_snapshot(folder: PathLike) -> dict[str, torch.Tensor]:
    """The vision/Q-Former tensors of a local HF BLIP-2 snapshot, as ImageEncoder keys (LLM shards unread)."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = sorted({weight_map[k] for k in weight_map if _hf_target_key(k) is not None})
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights (pytorch_model.bin snapshots are not supported)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{index_path} names shard {name}, which is missing")
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                target = _hf_target_key(key)
                if target is not None:
                    state[target] = f.get_tensor(key)
    check_finite(state, folder)
    return state


def load_hf_blip2_snapshot(encoder: nn.Module, folder: PathLike, *, assign: bool = False) -> None:
    """Load the ViT, ln_vision, Q-Former and query tokens of a local HF BLIP-2 snapshot (strict)."""
    folder = Path(folder)
    check_hf_blip2_config(encoder, folder)
    load_strict(encoder, read_hf_blip2_snapshot(folder), what="image encoder (BLIP-2 snapshot)", source=folder,
                assign=assign)


# ------------------------------------------------------------------------------- converted encoder file

_LAVIS_HINT_PREFIXES = ("Qformer.", "visual_encoder.", "blocks.", "cls_token", "pos_embed", "patch_embed.")


def load_encoder_weights(encoder: nn.Module, path: PathLike, *, assign: bool = False) -> None:
    """Load a file written by scripts/convert_lavis_checkpoint.py (ImageEncoder keys, strict)."""
    state = load_state_file(path)
    if any(k.startswith(_LAVIS_HINT_PREFIXES) for k in state):
        raise CheckpointError(
            f"{path} has LAVIS key names: convert it first with scripts/convert_lavis_checkpoint.py "
            "(or load it with load_lavis_encoder)"
        )
    load_strict(encoder, state, what="image encoder (converted)", source=path, assign=assign)


# ------------------------------------------------------------------------------------- MiniGPT-4 projector

LLM_WIDTHS = {
    4096: ("7B", "LLaMA-7B / Vicuna-7B / Llama-2-7B"),
    5120: ("13B", "Vicuna-13B / Llama-2-13B"),
    6656: ("30B/33B", "LLaMA-30B / Vicuna-33B"),
    8192: ("65B/70B", "LLaMA-65B / Llama-2-70B"),
}


def _size_name(width: int) -> str:
    return LLM_WIDTHS[width][0] if width in LLM_WIDTHS else "unknown size"


def _widths_table() -> str:
    return "\n".join(f"    {w}: {size} ({models})" for w, (size, models) in LLM_WIDTHS.items())


# What a MiniGPT-4 projector's input width says about the visual tokens it was trained on.
PROJECTOR_INPUTS = {
    768: "BLIP-2 Q-Former queries (MiniGPT-4 with Vicuna; model.visual_tokens: qformer)",
    5632: "4 concatenated EVA ViT-g patch tokens, 4 × 1408 (MiniGPT-4's Llama-2 variant, no Q-Former; "
          "model.visual_tokens: vit_patch4)",
}


def _inputs_name(width: int) -> str:
    return PROJECTOR_INPUTS.get(width, "visual tokens of no released MiniGPT-4 layout")


def load_minigpt4_projector(projector_linear: nn.Linear, path: PathLike, *, llm_hidden: int) -> None:
    """Copy MiniGPT-4's `llama_proj` (weight [llm_hidden, visual-token width], bias [llm_hidden]) into a Linear.

    The Linear is the plain projector or the VIB projector's mean head; both are stored as `llama_proj`.
    """
    if projector_linear.out_features != llm_hidden:
        raise ValueError(f"projector Linear has {projector_linear.out_features} outputs but llm_hidden={llm_hidden}")
    state = load_state_file(path)
    if "llama_proj.weight" not in state and any(k.startswith(_LAVIS_HINT_PREFIXES + ("query_tokens",)) for k in state):
        raise CheckpointError(
            f"{path}: this looks like a LAVIS BLIP-2/EVA checkpoint, not a MiniGPT-4 projector "
            f"(keys like {key_listing(sorted(state)[:3])}). Give it as the ViT/Q-Former checkpoint and use the "
            "MiniGPT-4 projector file (e.g. prerained_minigpt4_7b.pth) here."
        )
    expected = {"llama_proj.weight", "llama_proj.bias"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: a MiniGPT-4 projector checkpoint holds exactly llama_proj.weight and llama_proj.bias; "
            f"missing: {missing or 'none'}; unexpected: {key_listing(unexpected) if unexpected else 'none'}"
        )
    weight, bias = state["llama_proj.weight"], state["llama_proj.bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(f"{path}: llama_proj.weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
                              "do not form a Linear layer")
    out_width, in_width = weight.shape
    if out_width != llm_hidden:
        models = LLM_WIDTHS.get(out_width, ("", "an unknown model"))[1]
        raise CheckpointError(
            f"{path}: projector is {out_width}-wide: this is a {_size_name(out_width)} ({models}) checkpoint, "
            f"the LLM is {llm_hidden}-wide ({_size_name(llm_hidden)}). Use the projector trained for your LLM.\n"
            f"  known LLM widths:\n{_widths_table()}"
        )
    if in_width != projector_linear.in_features:
        raise CheckpointError(
            f"{path}: projector takes {in_width}-wide inputs, {_inputs_name(in_width)}; this model's visual tokens "
            f"are {projector_linear.in_features}-wide, {_inputs_name(projector_linear.in_features)}. Set "
            "model.visual_tokens to the projector's variant, or use the projector released for this one"
        )
    check_finite(state, path, as_dtypes={"llama_proj.weight": projector_linear.weight.dtype,
                                         "llama_proj.bias": projector_linear.bias.dtype})
    with torch.no_grad():
        projector_linear.weight.copy_(weight)
        projector_linear.bias.copy_(bias)


# ------------------------------------------------------------------------------------- LLaVA-1.5 projector

# The projector as stored by the original LLaVA release (an nn.Sequential: Linear, GELU, Linear) and by the
# llava-hf conversion (LlavaMultiModalProjector); both map onto linear_1 / linear_2 of the latter.
_LLAVA_RELEASE_KEYS = {"model.mm_projector.0.weight": "linear_1.weight", "model.mm_projector.0.bias": "linear_1.bias",
                       "model.mm_projector.2.weight": "linear_2.weight", "model.mm_projector.2.bias": "linear_2.bias"}
_LLAVA_HF_KEY = re.compile(r"(?:model\.)?multi_modal_projector\.(linear_[12]\.(?:weight|bias))")


def read_llava_folder_config(folder: PathLike) -> dict:
    """config.json of a local llava-hf folder, after checking that it is one (model_type "llava")."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{folder} is not a llava-hf model folder: no config.json "
                              "(expected a local copy of e.g. llava-hf/llava-1.5-7b-hf)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    if config.get("model_type") != "llava":
        raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'llava' "
                              "(a LLaVA-1.5 folder in Hugging Face format)")
    return config


def _read_llava_hf_projector(folder: Path) -> dict[str, torch.Tensor]:
    """linear_1/linear_2 tensors from the safetensors shards of a llava-hf folder (other shards unread)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if _LLAVA_HF_KEY.fullmatch(k)})
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors file holds multi_modal_projector.* "
                              "(pytorch_model.bin llava-hf folders are not supported; re-save with safetensors)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"{index_path} names shard {name}, which is missing")
        with safe_open(str(folder / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _LLAVA_HF_KEY.fullmatch(key)
                if match:
                    state[match.group(1)] = f.get_tensor(key)
    return state


def _read_llava_projector_file(path: Path) -> dict[str, torch.Tensor]:
    """A projector file: original-release keys (model.mm_projector.0/2.*) or llava-hf keys, one set only."""
    state = load_state_file(path)
    if set(state) == set(_LLAVA_RELEASE_KEYS):
        return {_LLAVA_RELEASE_KEYS[k]: v for k, v in state.items()}
    if state and all(_LLAVA_HF_KEY.fullmatch(k) for k in state):
        return {_LLAVA_HF_KEY.fullmatch(k).group(1): v for k, v in state.items()}
    if "model.mm_projector.weight" in state:
        hint = ("this is a single-Linear mm_projector (LLaVA v1 / mm_projector_type linear); LLaVA-1.5 uses the "
                "2-layer MLP (mlp2x_gelu)")
    elif "llama_proj.weight" in state:
        hint = "this is a MiniGPT-4 projector; use it with model.arch: minigpt4"
    else:
        hint = ("expected exactly " + ", ".join(_LLAVA_RELEASE_KEYS)
                + " (an original-release mm_projector.bin) or multi_modal_projector.linear_1/linear_2.*")
    raise CheckpointError(f"{path}: not a LLaVA-1.5 projector: {hint}; found keys {key_listing(sorted(state))}")


def read_llava_projector(path: PathLike) -> dict[str, torch.Tensor]:
    """{linear_1.weight, linear_1.bias, linear_2.weight, linear_2.bias} from an original-release
    `mm_projector.bin` (or a folder holding one) or a llava-hf folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            read_llava_folder_config(path)
            state = _read_llava_hf_projector(path)
        elif (path / "mm_projector.bin").is_file():
            state = _read_llava_projector_file(path / "mm_projector.bin")
        else:
            raise CheckpointError(f"{path}: neither a llava-hf folder (config.json) nor a folder with mm_projector.bin")
    else:
        state = _read_llava_projector_file(path)
    expected = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    if set(state) != expected:
        raise CheckpointError(f"{path}: incomplete LLaVA projector; missing {sorted(expected - set(state))}")
    check_finite(state, path)
    return state


def load_llava_projector(mlp: nn.Module, path: PathLike, *, llm_hidden: int) -> None:
    """Copy LLaVA-1.5's projector (Linear(vision → d), GELU, Linear(d → d)) into `mlp`, a module with
    `linear_1` / `linear_2` (transformers' LlavaMultiModalProjector: the plain projector or the VIB mean head).
    """
    state = read_llava_projector(path)
    w1, b1, w2, b2 = (state[k] for k in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"))
    if w1.dim() != 2 or w2.dim() != 2 or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise CheckpointError(f"{path}: linear_1 {tuple(w1.shape)}/{tuple(b1.shape)}, linear_2 {tuple(w2.shape)}/"
                              f"{tuple(b2.shape)} do not form two Linear layers")
    out_width, in_width = w1.shape
    if out_width != llm_hidden or w2.shape != (llm_hidden, llm_hidden):
        models = LLM_WIDTHS.get(out_width, ("", "an unknown model"))[1]
        raise CheckpointError(
            f"{path}: projector is {out_width}-wide: this is a {_size_name(out_width)} ({models}) checkpoint, "
            f"the LLM is {llm_hidden}-wide ({_size_name(llm_hidden)}). Use the projector trained for your LLM.\n"
            f"  known LLM widths:\n{_widths_table()}"
        )
    if in_width != mlp.linear_1.in_features:
        raise CheckpointError(
            f"{path}: projector takes {in_width}-wide inputs but the vision tower outputs "
            f"{mlp.linear_1.in_features}-wide patches (CLIP ViT-L/14: 1024); the checkpoint belongs to a "
            "different vision encoder"
        )
    check_finite(state, path, as_dtypes={key: mlp.get_parameter(key).dtype for key in state})
    with torch.no_grad():
        for key, tensor in state.items():
            mlp.get_parameter(key).copy_(tensor)
