"""A pretrained CNN as MiniGPT-4's frozen image encoder: the final feature map's positions are the visual tokens.

`model.visual_tokens: cnn_grid` (eval_configs/real_small_base.yaml): EfficientNet-Lite0 (ImageNet-1k, converted by
minigpt4/models/small_backbones.py into a transformers `EfficientNetForImageClassification` folder, `model.cnn_path`)
without its pooling and classifier. At 224 px its last feature map (after the 1×1 head conv, BatchNorm, relu6) is
7 × 7 × 1280; read row by row it gives 49 visual tokens of width 1280. `model.grid_group` concatenates that many
consecutive positions into one token, as MiniGPT-4's Llama-2 variant concatenates 4 consecutive ViT patches
(encoders.PatchConcatEncoder): 7 gives one token per row, 7 × 8960.

Pixels arrive normalised with CLIP's mean and std, as every image processor of this project gives them
(minigpt4/processors/image.py). Lite0 was trained on (pixel − 127) / 128 (TF's EfficientNet-Lite builder), so the
first step undoes the one normalisation and applies the other: one exact per-channel affine map.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import EfficientNetModel

from minigpt4.models import checkpoints as ckpt
from minigpt4.models.small_backbones import LITE_MEAN, LITE_STD, lite0_config
from minigpt4.processors.image import CLIP_MEAN, CLIP_STD

FEATURE_STRIDE = 32  # EfficientNet's five stride-2 stages: 224 px -> 7 × 7
# Keys of the converted folder's model.safetensors that the encoder knowingly leaves out (the ImageNet head).
UNUSED_HEAD_KEYS = ("classifier.weight", "classifier.bias")
# x_lite = (x_clip · std_clip + mean_clip − mean_lite) / std_lite = x_clip · INPUT_SCALE + INPUT_SHIFT, per channel
# (plain numbers, not buffers: an encoder built on the meta device gets only its checkpoint tensors).
INPUT_SCALE = tuple(c / s for c, s in zip(CLIP_STD, LITE_STD))
INPUT_SHIFT = tuple((c - m) / s for c, m, s in zip(CLIP_MEAN, LITE_MEAN, LITE_STD))


class CNNGridEncoder(nn.Module):
    """pixels [B, 3, S, S] (CLIP-normalised) -> [B, (S/32)² / group, 1280 · group]. Checkpoint keys: `vision_model.*`
    (transformers' EfficientNetModel). Frozen in this project: it never enters training mode, so its BatchNorms
    always use the ImageNet running statistics."""

    def __init__(self, vision_config: dict[str, Any] | None = None, group: int = 1):
        super().__init__()
        overrides = dict(vision_config or {})
        config = lite0_config(**overrides)
        self.vision_model = EfficientNetModel(config)
        side = math.ceil(config.image_size / FEATURE_STRIDE)
        positions = side * side
        if group < 1 or positions % group:
            raise ValueError(f"model.grid_group = {group}: the {side} × {side} feature map ({config.image_size} px) "
                             f"has {positions} positions, which cannot be concatenated in groups of {group}; "
                             "use a divisor of it (1: every position is a token)")
        self.group = group
        self.positions = positions
        self.num_query_tokens = positions // group  # image slots in the prompt
        self.train(False)

    @property
    def vision_config(self):
        return self.vision_model.config

    @property
    def out_dim(self) -> int:
        """Width of each visual token (the projector's input width): `group` positions side by side."""
        return self.vision_config.hidden_dim * self.group

    def init_random_weights(self) -> None:
        """Random weights (tests; a real model loads model.cnn_path) into an encoder built on the meta device."""
        self.vision_model.init_weights()

    def train(self, mode: bool = True):
        # Frozen encoder: always eval (BatchNorm with its running statistics, no dropout).
        return super().train(False)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 1280, S/32, S/32]: the CNN's last feature map."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        scale = torch.tensor(INPUT_SCALE, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
        shift = torch.tensor(INPUT_SHIFT, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
        x = pixel_values * scale + shift
        return self.vision_model.encoder(self.vision_model.embeddings(x)).last_hidden_state

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(pixel_values)
        batch, width = fmap.shape[:2]
        tokens = fmap.flatten(2).transpose(1, 2)  # row-major positions
        if tokens.shape[1] != self.positions:
            raise ValueError(f"{tuple(pixel_values.shape[-2:])} px images give {tokens.shape[1]} feature positions; "
                             f"the model was built for {self.positions} ({self.vision_config.image_size} px): resize "
                             "the images (the eval config's vis_processor.image_size) or set model.vision.image_size")
        return tokens.reshape(batch, self.num_query_tokens, width * self.group)


def load_cnn_folder(encoder: CNNGridEncoder, folder: str, *, assign: bool = False) -> None:
    """The converted folder's model.safetensors (`efficientnet.*` + the unused ImageNet head) into the encoder,
    strictly: every `efficientnet.*` tensor must match, and nothing else than the head may be in the file."""
    source = f"{folder}/model.safetensors"
    state = ckpt.load_state_file(source)
    prefix = "efficientnet."
    unknown = sorted(k for k in state if not k.startswith(prefix) and k not in UNUSED_HEAD_KEYS)
    if unknown:
        raise ckpt.CheckpointError(f"{source}: keys that are neither the EfficientNet body nor its ImageNet head: "
                                   f"{ckpt.key_listing(unknown)}")
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ckpt.load_strict(encoder.vision_model, body, what="the CNN encoder (model.cnn_path)", source=source, assign=assign)
