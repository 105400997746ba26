"""The frozen image encoders of MiniGPT-4: EVA-CLIP ViT-g/14 -> ln_vision, then either the Q-Former's 32 query
vectors (`ImageEncoder`, MiniGPT-4 with Vicuna) or, with no Q-Former, each 4 consecutive patch tokens concatenated
(`PatchConcatEncoder`, MiniGPT-4's Llama-2 variant).

Built from transformers' BLIP-2 modules (`Blip2VisionModel`, `Blip2QFormerModel`), which hold the same
weights as LAVIS's `VisionTransformer` + `BertModel` once the keys are renamed (see
`minigpt4.models.checkpoints`). Differences from LAVIS that matter, and how they are handled here:

* LAVIS's ViT has no final norm; its output goes through a separate `ln_vision` (LayerNorm, eps 1e-5,
  computed in fp32). transformers' `Blip2VisionModel` ends in `post_layernorm` with the *block* eps (1e-6),
  so we replace it by `nn.Identity` and keep our own fp32 `ln_vision` (HF snapshots store that norm under
  `vision_model.post_layernorm`; the loader renames it).
* transformers' Q-Former (with `use_qformer_text_input=False`) has no word/position embeddings and no text
  feed-forward (`intermediate` / `output`) in its layers: only the query branch that MiniGPT-4 uses. The
  LAVIS embeddings LayerNorm, which LAVIS applies to the query embeddings, is transformers' `qformer.layernorm`.
* transformers' Q-Former computes in its own parameter dtype and casts the image features to it. MiniGPT-4
  kept the Q-Former in fp32 and ran it under fp16 autocast; choose the dtype/autocast in the caller.
* LAVIS converted only the ViT's Linear/Conv weights to fp16 (norms, q/v biases, position embeddings stayed
  fp32); `model.precision: reference` does the same (minigpt4/models/precision.py), and the embeddings are
  computed as LAVIS computes them (`lavis_vision_embeddings`), so the residual stream is then fp32 as there.
* The encoder is frozen in this project, so it never enters training mode (`train()` keeps it in eval):
  the Q-Former's BERT dropout (0.1) must not be active, exactly as LAVIS's `disabled_train` ensured.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

# EVA-CLIP ViT-g/14 as BLIP-2 uses it: 39 of the checkpoint's 40 blocks, MLP 6144 (= int(1408 * 4.3637)).
EVA_VIT_G: dict[str, Any] = {
    "hidden_size": 1408,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "intermediate_size": 6144,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,  # the blocks' norms; ln_vision has its own eps (LN_VISION_EPS)
    "hidden_act": "gelu",  # exact (erf) GELU, as torch.nn.GELU() in EVA
    "attention_dropout": 0.0,
}

# BERT-base Q-Former with cross-attention to the image in every 2nd layer (layers 0, 2, 4, ...).
# vocab_size / max_position_embeddings / pad_token_id are bert-base-uncased's; transformers' config wants
# them although the query-only Q-Former has no text embeddings.
QFORMER_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,  # always set to the vision width by ImageEncoder
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "initializer_range": 0.02,
    "use_qformer_text_input": False,
}

LN_VISION_EPS = 1e-5
NUM_QUERY_TOKENS = 32

# Keys a config dict may hold besides the transformers config fields.
_EXTRA_CONFIG_KEYS = {"attn_implementation"}


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input/weight dtype, cast back to the input dtype.

    The ViT may run in fp16/bf16; normalising 1408 channels of its large activations in half precision
    loses accuracy, so LAVIS's `ln_vision` upcasts. We also upcast the affine parameters in case the whole
    encoder was cast to half precision.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def _merged(preset: dict[str, Any], overrides: dict[str, Any] | None, config_cls: type, what: str) -> dict:
    overrides = dict(overrides or {})
    allowed = set(config_cls.__annotations__) | _EXTRA_CONFIG_KEYS
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"{what} config: unknown keys {unknown}; valid keys: {sorted(allowed)}")
    return {**preset, **overrides}


def build_vision_config(overrides: dict[str, Any] | None = None) -> Blip2VisionConfig:
    """EVA ViT-g preset with `overrides` merged over it (e.g. {"attn_implementation": "eager"})."""
    return Blip2VisionConfig(**_merged(EVA_VIT_G, overrides, Blip2VisionConfig, "vision"))


def build_qformer_config(overrides: dict[str, Any] | None = None, *, vision_width: int) -> Blip2QFormerConfig:
    """BERT-base Q-Former preset with `overrides` merged over it; cross-attends to `vision_width` features."""
    merged = _merged(QFORMER_BASE, overrides, Blip2QFormerConfig, "qformer")
    given = (overrides or {}).get("encoder_hidden_size")
    if given is not None and given != vision_width:
        raise ValueError(
            f"qformer config: encoder_hidden_size={given} but the vision encoder is {vision_width}-wide; "
            "leave encoder_hidden_size out, it follows the vision width"
        )
    if merged["use_qformer_text_input"]:
        raise ValueError("qformer config: use_qformer_text_input must be False (MiniGPT-4 uses only the queries)")
    merged["encoder_hidden_size"] = vision_width
    return Blip2QFormerConfig(**merged)


def lavis_vision_embeddings(embeddings: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLS + patch embeddings + position embeddings, in the dtypes LAVIS's `VisionTransformer.forward_features`
    gets: the patch conv in its weight dtype, the CLS token and position embeddings in theirs, combined with
    torch's type promotion. With fp16 Linear/Conv weights and fp32 embeddings (LAVIS `convert_weights_to_fp16`)
    the sum, and with it the whole residual stream, is fp32. transformers' `Blip2VisionEmbeddings` casts all to
    the conv's dtype instead; with one dtype everywhere the two are the same computation, and then the module's
    own forward runs: FSDP makes `Blip2VisionEmbeddings` a unit of its own (transformers' `_no_split_modules`),
    and only a call through its forward gathers its sharded weights."""
    weight_dtype = embeddings.patch_embedding.weight.dtype
    if embeddings.class_embedding.dtype == weight_dtype and embeddings.position_embedding.dtype == weight_dtype:
        return embeddings(pixel_values)
    patch_embeds = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
    patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
    class_embeds = embeddings.class_embedding.expand(patch_embeds.shape[0], 1, -1)
    tokens = torch.cat([class_embeds, patch_embeds], dim=1)
    return tokens + embeddings.position_embedding[:, : tokens.shape[1]]


class VisionTrunk(nn.Module):
    """pixels [B, 3, H, W] -> ln_vision(EVA ViT) [B, 1 + patches, vision width]: what both encoders start from.

    Attribute names are part of the checkpoint format (`vision_model.*`, `ln_vision.*`), matching the HF BLIP-2
    layout except that `ln_vision` is its own module. Frozen in this project: it never enters training mode.
    """

    def __init__(self, vision_config: dict[str, Any] | None = None):
        super().__init__()
        v_cfg = build_vision_config(vision_config)
        self.vision_model = Blip2VisionModel(v_cfg)
        # LAVIS's ViT ends without a norm; its ln_vision (eps 1e-5, fp32) is ours below.
        self.vision_model.post_layernorm = nn.Identity()
        self.ln_vision = FP32LayerNorm(v_cfg.hidden_size, eps=LN_VISION_EPS)

    @property
    def vision_config(self) -> Blip2VisionConfig:
        return self.vision_model.config

    def init_random_weights(self) -> None:
        """Draw every weight once, with transformers' init (each part's own `initializer_range`), into an encoder
        built on the meta device and given storage by `to_empty` (models/from_config.py). Built directly, every
        Linear/Conv is drawn twice: torch's own reset in the constructor, then transformers' init over it (the
        1.1 B-parameter encoder's share of a 7B build's random-number work). On an encoder built off the meta
        device this draws nothing new: transformers marks what it has initialised and skips it."""
        self.vision_model.init_weights()
        self.ln_vision.reset_parameters()

    def train(self, mode: bool = True):
        # Frozen encoder: always eval, so no dropout ever fires even inside a model in train mode.
        return super().train(False)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        embeds = lavis_vision_embeddings(self.vision_model.embeddings, pixel_values)
        hidden = self.vision_model.encoder(inputs_embeds=embeds).last_hidden_state
        return self.ln_vision(hidden)


class ImageEncoder(VisionTrunk):
    """pixels [B, 3, H, W] -> Q-Former query outputs [B, num_query_tokens, qformer hidden].

    Checkpoint keys: `vision_model.*`, `ln_vision.*`, `qformer.*`, `query_tokens`.
    """

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        qformer_config: dict[str, Any] | None = None,
        num_query_tokens: int = NUM_QUERY_TOKENS,
    ):
        if num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
        super().__init__(vision_config)
        q_cfg = build_qformer_config(qformer_config, vision_width=self.vision_config.hidden_size)
        self.qformer = Blip2QFormerModel(q_cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, q_cfg.hidden_size))
        self._draw_query_tokens()
        self.train(False)

    def _draw_query_tokens(self) -> None:
        # Same init as LAVIS (only matters for random-weight tests; real runs load checkpoints).
        nn.init.normal_(self.query_tokens, mean=0.0, std=self.qformer_config.initializer_range)

    def init_random_weights(self) -> None:
        super().init_random_weights()
        self.qformer.init_weights()
        self._draw_query_tokens()

    @property
    def qformer_config(self) -> Blip2QFormerConfig:
        return self.qformer.config

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def out_dim(self) -> int:
        """Width of each output query vector (the projector's input width)."""
        return self.qformer.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_features(pixel_values)
        query_embeds = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        # Every image token is attended to. An all-ones encoder_attention_mask is the same as no mask
        # (transformers drops it after checking it on the device), so we pass none and skip that check.
        out = self.qformer(
            query_embeds=query_embeds,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,
        )
        return out.last_hidden_state


class PatchConcatEncoder(VisionTrunk):
    """MiniGPT-4's Llama-2 variant, which has no Q-Former: ln_vision(ViT) with the CLS token dropped, each
    `group` consecutive patch tokens concatenated, [B, 256, 1408] -> [B, 64, 4 · 1408 = 5632] at 224 px
    (Vision-CAIR/MiniGPT-4 minigpt4/models/minigpt4.py `encode_img`: `image_embeds[:, 1:, :]` then
    `view(bs, pn / 4, hs * 4)`). Checkpoint keys: `vision_model.*`, `ln_vision.*`.
    """

    def __init__(self, vision_config: dict[str, Any] | None = None, group: int = 4):
        super().__init__(vision_config)
        cfg = self.vision_config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        if group < 1 or patches % group:
            raise ValueError(f"vision config: {patches} patch tokens ({cfg.image_size} px / patch {cfg.patch_size}) "
                             f"cannot be concatenated in groups of {group}")
        self.group = group
        self.num_query_tokens = patches // group  # image slots in the prompt
        self.train(False)

    @property
    def out_dim(self) -> int:
        """Width of each visual token (the projector's input width): `group` patch tokens side by side."""
        return self.vision_config.hidden_size * self.group

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.vision_features(pixel_values)[:, 1:]
        batch, count, width = patches.shape
        return patches.reshape(batch, count // self.group, width * self.group)
