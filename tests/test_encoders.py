"""ImageEncoder construction: presets, configs, meta-device build, fp32 ln_vision, frozen eval mode."""
from __future__ import annotations

import re

import pytest
import torch

from minigpt4.models.encoders import EVA_VIT_G, QFORMER_BASE, FP32LayerNorm, ImageEncoder

TINY_VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                   image_size=28, patch_size=14)
TINY_QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)


def tiny_encoder(**vision_extra) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder({**TINY_VISION, **vision_extra}, TINY_QFORMER, num_query_tokens=4)


def eva_vit_g_param_count(width=1408, blocks=39, mlp=6144, patch=14, image=224) -> int:
    """Parameters of the ViT from first principles (no final norm: that is ln_vision)."""
    tokens = (image // patch) ** 2 + 1
    embeddings = 3 * patch * patch * width + width + width + tokens * width  # conv w+b, cls, positions
    per_block = (
        2 * 2 * width  # two LayerNorms
        + width * 3 * width + 3 * width  # qkv weight + (q, 0, v) bias
        + width * width + width  # output projection
        + width * mlp + mlp + mlp * width + width  # MLP
    )
    return embeddings + blocks * per_block


def test_full_size_builds_on_meta_with_expected_shapes():
    with torch.device("meta"):
        encoder = ImageEncoder()
    assert all(p.device.type == "meta" for p in encoder.parameters())
    vit_params = sum(p.numel() for p in encoder.vision_model.parameters())
    assert vit_params == eva_vit_g_param_count()
    assert round(vit_params / 1e6, 1) == 985.9
    assert len(encoder.vision_model.encoder.layers) == EVA_VIT_G["num_hidden_layers"] == 39
    assert encoder.out_dim == QFORMER_BASE["hidden_size"] == 768
    assert tuple(encoder.query_tokens.shape) == (1, 32, 768)
    assert encoder.qformer.config.encoder_hidden_size == 1408
    keys = encoder.state_dict().keys()
    assert not any("post_layernorm" in k for k in keys)  # replaced by our ln_vision
    assert "ln_vision.weight" in keys and encoder.ln_vision.eps == 1e-5
    # Cross-attention in layers 0, 2, ..., 10 only; query branch only (no text feed-forward).
    crossed = [i for i, layer in enumerate(encoder.qformer.encoder.layer) if layer.has_cross_attention]
    assert crossed == list(range(0, 12, 2))
    assert not any(re.search(r"\.layer\.\d+\.(intermediate|output)\.", k) for k in keys)
    assert any(re.search(r"\.layer\.\d+\.output_query\.", k) for k in keys)


def test_forward_shape_and_attn_implementations_agree():
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    eager = tiny_encoder(attn_implementation="eager")
    sdpa = tiny_encoder(attn_implementation="sdpa")
    assert eager.vision_model.config._attn_implementation == "eager"
    assert sdpa.vision_model.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    out = eager(pixels)
    assert out.shape == (2, 4, 16) and eager.out_dim == 16
    torch.testing.assert_close(sdpa(pixels), out, atol=1e-5, rtol=1e-5)


def test_frozen_encoder_stays_in_eval_mode():
    encoder = tiny_encoder()
    wrapper = torch.nn.Sequential(encoder)
    wrapper.train()
    assert not any(m.training for m in encoder.modules())
    pixels = torch.randn(1, 3, 28, 28)
    # Q-Former dropout is 0.1 in the config; in eval mode two passes agree exactly.
    torch.testing.assert_close(encoder(pixels), encoder(pixels), atol=0, rtol=0)


def test_ln_vision_computes_in_fp32_and_returns_input_dtype():
    norm = FP32LayerNorm(8, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(2, 3, 8) * 300 + 1000).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.float(), (8,), norm.weight, norm.bias, 1e-5).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_config_errors_are_explicit():
    with pytest.raises(ValueError, match="unknown keys.*hiden_size"):
        ImageEncoder({**TINY_VISION, "hiden_size": 3}, TINY_QFORMER)
    with pytest.raises(ValueError, match="encoder_hidden_size=64.*32-wide"):
        ImageEncoder(TINY_VISION, {**TINY_QFORMER, "encoder_hidden_size": 64})
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_encoder()(torch.randn(3, 28, 28))
