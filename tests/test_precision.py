"""`model.precision`: the dtype of every part (full size, on the meta device), LAVIS's fp16 ViT and its dtype flow,
the model's own autocast, and how run.amp follows the precision (minigpt4/models/precision.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from minigpt4.common.config import ConfigError, ModelConfig, merge, resolve_training_amp, validate_model_config
from minigpt4.common.tiny_models import TINY_QFORMER, TINY_VISION
from minigpt4.models.encoders import ImageEncoder, lavis_vision_embeddings
from minigpt4.models.from_config import build_model
from minigpt4.models.precision import convert_vit_to_fp16, plan_precision

ROOT = Path(__file__).resolve().parents[1]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _model_cfg(**values):
    return merge(ModelConfig, values, where="model")


def _dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("precision, llm, encoder, vit_fp16, autocast", [
    ("fp32", torch.float32, torch.float32, False, None),
    ("bf16", torch.bfloat16, torch.bfloat16, False, None),
    ("reference", torch.float16, torch.float32, True, torch.float16),
])
def test_plan_of_each_precision_on_a_gpu(precision, llm, encoder, vit_fp16, autocast):
    plan = plan_precision(_model_cfg(precision=precision), CUDA)
    assert (plan.llm, plan.encoder, plan.vit_linear_fp16, plan.autocast) == (llm, encoder, vit_fp16, autocast)


def test_auto_keeps_the_per_part_dtype_keys():
    assert plan_precision(_model_cfg(), CUDA).llm == torch.bfloat16
    assert plan_precision(_model_cfg(), CPU).llm == torch.float32
    plan = plan_precision(_model_cfg(llm_dtype="fp16", encoder_dtype="fp32"), CUDA)
    assert (plan.llm, plan.encoder, plan.autocast) == (torch.float16, torch.float32, None)


def test_reference_with_the_vit_on_the_cpu_runs_it_in_fp32_as_minigpt4_vit_to_cpu():
    plan = plan_precision(_model_cfg(precision="reference", encoder_device="cpu"), CUDA, CPU)
    assert (plan.llm, plan.encoder, plan.vit_linear_fp16, plan.autocast) == (torch.float16, torch.float32, False,
                                                                            torch.float16)


def test_reference_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match="reference .*needs a GPU.*cpu"):
        plan_precision(_model_cfg(precision="reference"), CPU)


@pytest.mark.parametrize("values, message", [
    (dict(precision="fp16"), "model.precision = 'fp16'; expected one of auto, fp32, bf16, reference"),
    (dict(precision="reference", llm_dtype="fp32"), "model.llm_dtype = 'fp32' contradicts model.precision = "
                                                    "'reference'"),
    (dict(precision="reference", encoder_dtype="fp16"), "model.encoder_dtype = 'fp16' contradicts model.precision"),
    (dict(precision="bf16", encoder_dtype="fp16"), "model.encoder_dtype = 'fp16' contradicts model.precision = "
                                                   "'bf16'"),
    (dict(precision="reference", arch="llava15"), "reference reproduces MiniGPT-4/AdaVIB; for model.arch = 'llava15'"),
])
def test_precision_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        validate_model_config(_model_cfg(**values), check_files=False)
    assert message in str(err.value)


def test_a_dtype_key_that_agrees_with_the_precision_is_fine():
    for values in (dict(precision="fp32", llm_dtype="fp32", encoder_dtype="fp32"),
                   dict(precision="reference", llm_dtype="fp16")):
        validate_model_config(_model_cfg(**values), check_files=False)


def test_reference_at_full_size_puts_every_part_in_the_sources_dtype():
    model = build_model(dict(precision="reference", llm_preset="vicuna-7b"), device="meta")
    vision = model.encoder.vision_model
    for name, module in vision.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert _dtypes(module) == {torch.float16}, name
        elif isinstance(module, nn.LayerNorm):
            assert _dtypes(module) == {torch.float32}, name
    embeddings = vision.embeddings
    assert embeddings.class_embedding.dtype == embeddings.position_embedding.dtype == torch.float32
    assert _dtypes(model.encoder.ln_vision) == _dtypes(model.encoder.qformer) == {torch.float32}
    assert model.encoder.query_tokens.dtype == torch.float32
    assert _dtypes(model.projector) == {torch.float32}
    assert _dtypes(model.llm) == {torch.float16}
    assert model.autocast_dtype == torch.float16


def test_bf16_and_fp32_at_full_size_have_one_dtype_for_the_frozen_parts():
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = build_model(dict(precision=precision, llm_preset="vicuna-7b"), device="meta")
        assert _dtypes(model.encoder) == _dtypes(model.llm) == {dtype}
        assert _dtypes(model.projector) == {torch.float32} and model.autocast_dtype is None


def test_convert_vit_to_fp16_is_lavis_rule():
    encoder = ImageEncoder(TINY_VISION, TINY_QFORMER, num_query_tokens=4)
    convert_vit_to_fp16(encoder.vision_model)
    for name, param in encoder.named_parameters():
        in_vit_layer = name.startswith("vision_model.") and any(
            part in name for part in ("qkv.", "projection.", "fc1.", "fc2.", "patch_embedding."))
        assert param.dtype == (torch.float16 if in_vit_layer else torch.float32), name


def test_fp16_vit_with_fp32_embeddings_keeps_an_fp32_residual_stream_as_lavis():
    """LAVIS: cat(fp32 CLS, fp16 patches) + fp32 positions promotes to fp32, and each block adds its fp16
    output to that fp32 stream. transformers' own embeddings would cast everything to fp16."""
    torch.manual_seed(0)
    encoder = ImageEncoder(TINY_VISION, TINY_QFORMER, num_query_tokens=4)
    convert_vit_to_fp16(encoder.vision_model)
    pixels = torch.randn(2, 3, 28, 28)
    emb = encoder.vision_model.embeddings
    tokens = lavis_vision_embeddings(emb, pixels)
    patches = emb.patch_embedding(pixels.half()).flatten(2).transpose(1, 2)
    expected = torch.cat([emb.class_embedding.expand(2, 1, -1), patches.float()], 1) + emb.position_embedding
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
             for layer in encoder.vision_model.encoder.layers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        features = encoder.vision_features(pixels)
    for hook in hooks:
        hook.remove()
    assert seen == [torch.float32] * len(encoder.vision_model.encoder.layers) and features.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lavis_embeddings_equal_transformers_embeddings_for_one_dtype(dtype):
    torch.manual_seed(1)
    encoder = ImageEncoder(TINY_VISION, TINY_QFORMER, num_query_tokens=4).to(dtype)
    pixels = torch.randn(2, 3, 28, 28)
    emb = encoder.vision_model.embeddings
    with torch.no_grad():
        assert torch.equal(lavis_vision_embeddings(emb, pixels), emb(pixels))


def test_model_autocast_keeps_the_wider_visual_tokens_like_the_sources_torch_cat(tiny_model_factory):
    model = tiny_model_factory("vib", llm_dtype="bf16")
    text = model.build_generation_text(["###Human: <Img><ImageHere></Img> hi ###Assistant: "])
    tokens = torch.randn(1, model.num_query_tokens, model.llm.config.hidden_size)
    assert model.embed(text, tokens).dtype == torch.bfloat16  # no model autocast: the LLM's dtype
    model.autocast_dtype = torch.bfloat16
    embeds = model.embed(text, tokens)
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds[0][text.image_mask[0]], tokens[0])


def test_model_autocast_wraps_forward_and_generate(tiny_model_factory):
    model = tiny_model_factory("vib", llm_dtype="bf16", encoder_dtype="bf16")
    model.autocast_dtype = torch.bfloat16  # CPU stand-in for the fp16 CUDA autocast of precision: reference
    seen = []
    # the decoder: training runs it without the LM head (answer-only CE), generation through LlamaForCausalLM
    model.llm.get_decoder().register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    images = torch.randn(2, 3, 28, 28)
    model.train()
    out = model({"image": images, "answer": ["a dog", "a cat on a sofa"], "instruction": [None, None]})
    assert torch.isfinite(out["loss"]) and seen == [True]
    answers = model.generate(["###Human: <Img><ImageHere></Img> hi ###Assistant: "] * 2, images, max_new_tokens=3)
    assert len(answers) == 2 and all(seen)


@pytest.mark.parametrize("precision, amp, expected", [
    ("reference", None, "fp16"), ("reference", "fp16", "fp16"), ("bf16", None, "bf16"), ("fp32", None, "none"),
    ("auto", None, None), ("auto", "fp16", "fp16"),
])
def test_run_amp_follows_model_precision(precision, amp, expected):
    assert resolve_training_amp(precision, amp) == expected


def test_train_config_takes_run_amp_from_model_precision(tmp_path):
    import train

    (tmp_path / "images").mkdir()
    (tmp_path / "captions.json").write_text("[]")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"arch": "minigpt4"},
        "datasets": {"caption_json": {"ann_path": str(tmp_path / "captions.json"),
                                      "image_dir": str(tmp_path / "images")}},
        "run": {"output_dir": str(tmp_path / "out")},
    }))
    for precision, amp in (("reference", "fp16"), ("bf16", "bf16"), ("fp32", "none")):
        assert train.load_train_config(str(recipe), [f"model.precision={precision}"])[1].amp == amp
    assert train.load_train_config(str(recipe), [])[1].amp == "bf16"  # auto: run.amp's own default
    with pytest.raises(ConfigError, match="run.amp = 'none' contradicts model.precision = 'bf16'"):
        train.load_train_config(str(recipe), ["model.precision=bf16", "run.amp=none"])
    with pytest.raises(ConfigError, match="run.distributed: fsdp cannot shard model.precision: reference"):
        train.load_train_config(str(recipe), ["model.precision=reference", "run.distributed=fsdp"])


@pytest.mark.parametrize("recipe", ["adavib_minigpt4_7b", "vib_fixed_beta_minigpt4_7b", "linear_ce_minigpt4_7b",
                                    "adavib_minigpt4_llama2_7b"])
def test_minigpt4_paper_recipes_train_as_the_sources(recipe):
    raw = yaml.safe_load((ROOT / "train_configs" / f"{recipe}.yaml").read_text())
    assert raw["model"]["precision"] == "reference"
    assert resolve_training_amp(raw["model"]["precision"], raw["run"].get("amp")) == "fp16"
    cfg = merge(ModelConfig, raw["model"], where=recipe, allow_missing=True)
    validate_model_config(cfg, check_files=False)
    assert OmegaConf.select(cfg, "llm_dtype") == "auto"
