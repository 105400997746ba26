"""MiniGPT-4's Llama-2 variant, as released (Vision-CAIR/MiniGPT-4 minigpt4/models/minigpt4.py, has_qformer False):
no Q-Former, each 4 consecutive ViT patch tokens concatenated (64 × 5632), llama_proj 5632 -> 4096."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from minigpt4.common.config import ConfigError, ModelConfig, merge, validate_model_config
from minigpt4.common.tiny_models import TINY_VISION
from minigpt4.models import released_weights
from minigpt4.models.checkpoints import CheckpointError
from minigpt4.models.encoders import PatchConcatEncoder
from minigpt4.models.from_config import build_model
from minigpt4.models.vib import VIBProjector

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_PROJECTOR_PARAMS = 5632 * 4096 + 4096  # 23,072,768
TINY_PATCH_VISION = dict(TINY_VISION, image_size=56)  # 16 patches -> 4 visual tokens of width 4 · 32


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _released_llama2_projector(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in the layout of pretrained_minigpt4_llama2_7b.pth: {"model": {llama_proj.weight, llama_proj.bias}}."""
    g = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(4096, 5632, generator=g) * 0.01,
             "llama_proj.bias": torch.randn(4096, generator=g) * 0.01}
    torch.save({"model": state}, path)
    return state


def test_full_size_llama2_variant_on_meta_has_the_released_shapes():
    model = build_model(dict(visual_tokens="vit_patch4", llm_preset="llama2-7b", mm_projector_type="linear",
                             prompt_template="llama2"), device="meta")
    encoder = model.encoder
    assert isinstance(encoder, PatchConcatEncoder) and not hasattr(encoder, "qformer")
    assert (encoder.num_query_tokens, encoder.out_dim, model.num_query_tokens) == (64, 5632, 64)
    assert _count(model.projector) == LLAMA2_PROJECTOR_PARAMS == 23_072_768
    assert tuple(model.projector.llama_proj.weight.shape) == (4096, 5632)
    vib = build_model(dict(visual_tokens="vit_patch4", llm_preset="llama2-7b", prompt_template="llama2"), device="meta")
    assert _count(vib.projector.llama_proj) == LLAMA2_PROJECTOR_PARAMS
    assert _count(vib.projector) == 2 * LLAMA2_PROJECTOR_PARAMS + 2 * 4096  # + σ head, prior μ_p / s_p


def test_released_llama2_projector_loads_into_the_linear_and_the_vib_mean_head(tmp_path):
    path = tmp_path / "pretrained_minigpt4_llama2_7b.pth"
    state = _released_llama2_projector(path)
    linear = torch.nn.Linear(5632, 4096)
    released_weights.load_minigpt4_projector(linear, path, llm_hidden=4096)
    assert torch.equal(linear.weight, state["llama_proj.weight"]) and torch.equal(linear.bias, state["llama_proj.bias"])
    vib = VIBProjector(5632, 4096)
    std_before = vib.llama_proj_std.weight.clone()
    released_weights.load_minigpt4_projector(vib.llama_proj, path, llm_hidden=4096)
    assert torch.equal(vib.llama_proj.weight, state["llama_proj.weight"])
    assert torch.equal(vib.llama_proj_std.weight, std_before)  # the σ head and prior start fresh


def test_llama2_projector_into_a_qformer_model_names_the_variant(tmp_path):
    path = tmp_path / "pretrained_minigpt4_llama2_7b.pth"
    _released_llama2_projector(path)
    with pytest.raises(CheckpointError) as err:
        released_weights.load_minigpt4_projector(torch.nn.Linear(768, 4096), path, llm_hidden=4096)
    message = str(err.value)
    assert "5632-wide inputs" in message and "Llama-2 variant" in message and "vit_patch4" in message
    assert "different Q-Former" not in message
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}},
               tmp_path / "prerained_minigpt4_7b.pth")
    with pytest.raises(CheckpointError, match="768-wide inputs, BLIP-2 Q-Former queries.*5632-wide"):
        released_weights.load_minigpt4_projector(torch.nn.Linear(5632, 4096), tmp_path / "prerained_minigpt4_7b.pth",
                                                 llm_hidden=4096)


def test_patch_tokens_are_four_consecutive_patches_side_by_side():
    torch.manual_seed(0)
    encoder = PatchConcatEncoder(TINY_PATCH_VISION)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = encoder(pixels)
        trunk = encoder.vision_features(pixels)  # (2, 1 + 16, 32): CLS first
    assert tokens.shape == (2, 4, 128) and trunk.shape == (2, 17, 32)
    for j in range(4):
        for k in range(4):
            assert torch.equal(tokens[:, j, 32 * k: 32 * (k + 1)], trunk[:, 1 + 4 * j + k])


def test_patch_groups_must_divide_the_patch_count():
    with pytest.raises(ValueError, match="4 patch tokens .* groups of 3"):
        PatchConcatEncoder(TINY_VISION, group=3)


def test_vit_alone_loads_with_an_identity_ln_vision(tmp_path):
    width, blocks = 32, 2
    reference = PatchConcatEncoder(dict(TINY_PATCH_VISION, num_hidden_layers=blocks))
    lavis = {"cls_token": reference.vision_model.embeddings.class_embedding.detach().clone(),
             "pos_embed": reference.vision_model.embeddings.position_embedding.detach().clone(),
             "patch_embed.proj.weight": reference.vision_model.embeddings.patch_embedding.weight.detach().clone(),
             "patch_embed.proj.bias": reference.vision_model.embeddings.patch_embedding.bias.detach().clone()}
    for i in range(blocks + 1):  # one block more than used, as eva_vit_g.pth has 40 for 39
        layer = reference.vision_model.encoder.layers[min(i, blocks - 1)]
        b = f"blocks.{i}."
        qkv_bias = layer.self_attn.qkv.bias.detach()
        lavis.update({
            b + "norm1.weight": layer.layer_norm1.weight.detach(), b + "norm1.bias": layer.layer_norm1.bias.detach(),
            b + "attn.qkv.weight": layer.self_attn.qkv.weight.detach(),
            b + "attn.q_bias": qkv_bias[:width], b + "attn.v_bias": qkv_bias[2 * width:],
            b + "attn.proj.weight": layer.self_attn.projection.weight.detach(),
            b + "attn.proj.bias": layer.self_attn.projection.bias.detach(),
            b + "norm2.weight": layer.layer_norm2.weight.detach(), b + "norm2.bias": layer.layer_norm2.bias.detach(),
            b + "mlp.fc1.weight": layer.mlp.fc1.weight.detach(), b + "mlp.fc1.bias": layer.mlp.fc1.bias.detach(),
            b + "mlp.fc2.weight": layer.mlp.fc2.weight.detach(), b + "mlp.fc2.bias": layer.mlp.fc2.bias.detach(),
        })
    torch.save({k: v.clone() for k, v in lavis.items()}, tmp_path / "eva_vit_g.pth")
    with torch.device("meta"):
        encoder = PatchConcatEncoder(dict(TINY_PATCH_VISION, num_hidden_layers=blocks))
    released_weights.load_lavis_vit_without_qformer(encoder, tmp_path / "eva_vit_g.pth", assign=True)
    assert torch.equal(encoder.ln_vision.weight, torch.ones(width)) and torch.equal(encoder.ln_vision.bias,
                                                                                     torch.zeros(width))
    for name, tensor in reference.vision_model.state_dict().items():
        assert torch.equal(encoder.vision_model.state_dict()[name], tensor), name
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():  # the reference's own ln_vision is LayerNorm's init too: same output
        assert torch.equal(encoder(pixels), reference(pixels))


def test_tiny_llama2_variant_trains_and_generates(tiny_model_factory):
    model = tiny_model_factory("vib", visual_tokens="vit_patch4", vision=dict(TINY_PATCH_VISION), qformer={},
                               prompt_template="llama2", max_txt_len=160)
    assert isinstance(model.encoder, PatchConcatEncoder) and model.num_query_tokens == 4
    assert model.projector.llama_proj.in_features == 128 and model.end_sym == "</s>"
    images = torch.randn(2, 3, 56, 56)
    model.train()
    out = model({"image": images, "answer": ["a dog on the grass", "two cats"], "instruction": [None, None]})
    assert torch.isfinite(out["loss"]) and out["kl"] > 0
    out["loss"].backward()
    assert model.projector.llama_proj.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    model.eval()
    with torch.no_grad():  # a random LM has near-tied logits; sharpen them so greedy argmax has clear margins
        model.llm.lm_head.weight.mul_(20.0)
    prompt = "[INST] <Img><ImageHere></Img> Describe this image. [/INST] "
    answers = model.generate([prompt, prompt], images, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers), answers
    # Each row answers for its own image: the batch gives what each image alone gives.
    assert answers == [model.generate([prompt], images[i: i + 1], max_new_tokens=4)[0] for i in range(2)]


@pytest.mark.parametrize("values, message", [
    (dict(encoder_path="x.safetensors"), "model.encoder_path is not used by model.visual_tokens = 'vit_patch4'"),
    (dict(qformer_path="blip2.pth", vit_path="eva.pth"), "model.qformer_path is not used"),
    (dict(blip2_hf_path="blip2"), "model.blip2_hf_path is not used"),
    (dict(qformer={"hidden_size": 32}), "model.qformer is not used"),
    (dict(arch="llava15"), "'vit_patch4' is for model.arch: minigpt4"),
    (dict(visual_tokens="patches"), "model.visual_tokens = 'patches'; expected one of qformer, vit_patch4"),
])
def test_llama2_variant_config_errors(values, message):
    cfg = merge(ModelConfig, {"visual_tokens": "vit_patch4", **values}, where="model")
    with pytest.raises(ConfigError) as err:
        validate_model_config(cfg, check_files=False)
    assert message in str(err.value)


def test_vit_path_alone_is_the_llama2_variant_input():
    validate_model_config(merge(ModelConfig, {"visual_tokens": "vit_patch4", "vit_path": "eva.pth"}, where="model"),
                          check_files=False)
    with pytest.raises(ConfigError, match="come together"):  # the Q-Former model still needs both LAVIS files
        validate_model_config(merge(ModelConfig, {"vit_path": "eva.pth"}, where="model"), check_files=False)


def test_llama2_recipe_and_eval_config_build_at_full_size(tmp_path):
    raw = yaml.safe_load((ROOT / "train_configs" / "adavib_minigpt4_llama2_7b.yaml").read_text())
    cfg = merge(ModelConfig, raw["model"], where="recipe", allow_missing=True)
    validate_model_config(cfg, check_files=False)
    assert (cfg.visual_tokens, cfg.prompt_template, cfg.max_txt_len) == ("vit_patch4", "llama2", 160)
    model = build_model(cfg, device="meta")
    assert _count(model.projector.llama_proj) == LLAMA2_PROJECTOR_PARAMS

    from minigpt4.eval.eval_config import load_eval_config

    for name in ("vit.pth", "projector.pth"):
        (tmp_path / name).write_bytes(b"")
    for name in ("llm", "images", "annotations"):
        (tmp_path / name).mkdir()
    ev = load_eval_config(str(ROOT / "eval_configs" / "minigpt4_llama2_7b_original.yaml"), [
        f"model.vit_path={tmp_path / 'vit.pth'}", f"model.llm_path={tmp_path / 'llm'}",
        f"model.projector_path={tmp_path / 'projector.pth'}", f"eval.image_dir={tmp_path / 'images'}",
        f"eval.chair.coco_annotations={tmp_path / 'annotations'}"])
    assert ev.model.visual_tokens == "vit_patch4" and ev.model.precision == "reference"
