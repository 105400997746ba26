"""MiniGPT-4 model behaviour on a tiny random model: freezing, S-sample ordering, label masks, generation."""
import pytest
import torch
from _model_checks import assert_sample_major_pairing, toy_batch

from minigpt4.conversation.templates import get_template
from minigpt4.models.checkpoints import trainable_tensors


def test_only_projector_trains_and_frozen_parts_stay_eval(tiny_model_factory):
    model = tiny_model_factory("vib").train()
    assert not model.llm.training and not model.encoder.training and model.projector.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(toy_batch())
    out["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    assert set(trainable_tensors(model)) == trainable
    assert {"loss", "ce", "kl_term", "alpha", "entropy_ratio", "sigma"} <= set(out)
    assert torch.allclose(out["loss"], out["ce"] + out["kl_term"])


def test_linear_projector_loss_is_ce_only(tiny_model_factory):
    model = tiny_model_factory("linear").train()
    out = model(toy_batch())
    assert out["kl_term"].item() == 0.0 and torch.allclose(out["loss"], out["ce"])
    assert model.vib is None  # the linear projector has no VIB settings


def test_answer_cross_entropy_equals_the_llms_own_labels_loss(tiny_model_factory):
    """The CE computed only at answer positions is the LLM's `labels=` loss over the whole sequence, and it
    changes when one answer token's label changes (so a shifted or dropped position would be caught)."""
    model = tiny_model_factory("linear").eval()
    batch = toy_batch()
    text = model.build_training_text([None] * len(batch["answer"]), batch["answer"])
    embeds = model.embed(text, model.project(model._features(batch))[0])
    with torch.no_grad():
        reference = model.llm(inputs_embeds=embeds, attention_mask=text.attention_mask, labels=text.labels).loss
        ours = model.answer_cross_entropy(embeds, text)
        torch.testing.assert_close(ours, reference.float(), rtol=1e-6, atol=1e-6)
        first_answer = (text.labels[0] != -100).nonzero()[0, 0]
        moved = text.labels.clone()
        moved[0, first_answer - 1] = text.labels[0, first_answer]  # one more labelled position
        moved_text = type(text)(text.input_ids, text.image_mask, text.attention_mask, moved)
        assert not torch.isclose(model.answer_cross_entropy(embeds, moved_text), ours)


def test_model_vib_settings_are_the_projectors_own(tiny_model_factory):
    """`model.vib` from the config goes whole to the VIB projector, which owns it: the model keeps no copy."""
    from minigpt4.common.config import VIBConfig

    model = tiny_model_factory("vib", vib=dict(num_samples=2, beta=0.5, adaptive=False, kl_on="token")).train()
    assert model.vib is model.projector.config
    assert model.vib == VIBConfig(num_samples=2, beta=0.5, adaptive=False, kl_on="token")
    assert not any(hasattr(model, name) for name in ("beta", "adaptive", "num_samples"))
    out = model(toy_batch())
    assert torch.allclose(out["kl_term"], 0.5 * out["kl"])  # β·mean(KL): not adaptive


def test_sample_s_of_image_b_meets_text_of_image_b(tiny_model_factory):
    model = tiny_model_factory("vib").train()
    with torch.no_grad():  # σ ≈ 0 so every noisy sample equals its image's μ and can be recognised
        model.projector.llama_proj_std.weight.zero_()
        model.projector.llama_proj_std.bias.fill_(-30.0)
    assert_sample_major_pairing(model)


def test_golden_label_masking_two_rows(tiny_model_factory):
    model = tiny_model_factory("linear", prompt_template="vicuna_v0")
    tok = model.tokenizer
    n = model.num_query_tokens
    instructions = ["Describe this image.", None]
    answers = ["a red ball", "two cats on a sofa"]
    text = model.build_training_text(instructions, answers)
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    pad = tok.pad_token_id
    rows = [
        ([tok.bos_token_id] + ids("###Human: <Img>"), ids("</Img> Describe this image. ###Assistant: "),
         ids("a red ball###")),
        ([tok.bos_token_id] + ids("###Human: <Img>"), ids("</Img> "), ids("two cats on a sofa###")),
    ]
    width = max(len(a) + n + len(b) + len(c) for a, b, c in rows)
    assert text.input_ids.shape == (2, width)
    for i, (before, after, target) in enumerate(rows):
        length = len(before) + n + len(after) + len(target)
        expect_ids = before + [pad] * n + after + target + [pad] * (width - length)
        expect_labels = [-100] * (len(before) + n + len(after)) + target + [-100] * (width - length)
        assert text.input_ids[i].tolist() == expect_ids
        assert text.labels[i].tolist() == expect_labels
        assert text.attention_mask[i].tolist() == [1] * length + [0] * (width - length)
        assert text.image_mask[i].sum().item() == n
        assert text.image_mask[i, len(before): len(before) + n].all()


def test_llama2_template_and_truncation(tiny_model_factory):
    model = tiny_model_factory("linear", prompt_template="llama2", max_txt_len=3)
    assert model.end_sym == "</s>" and get_template("llama2").prompt("hi").startswith("[INST] <Img>")
    text = model.build_training_text(["hi"], ["a very long answer that will be cut to three tokens"])
    assert (text.labels != -100).sum().item() == 3


def _prompts():
    return ["###Human: <Img><ImageHere></Img> Describe this image.###Assistant:",
            "A chat. ###Human: <Img><ImageHere></Img> Is there a dog in the image? Answer please.###Assistant:"]


def test_batched_generation_equals_batch_one_and_stops_per_row(tiny_model_factory):
    model = tiny_model_factory("vib").eval()
    images = toy_batch()["image"]
    model.end_sym = "\u0000never"  # first: no stop, to see what the random model says
    free = model.generate(_prompts(), images, max_new_tokens=12)
    assert all(len(t) > 0 for t in free)
    # Use a piece of row 0's free text as the end string: each row must stop right before its first
    # occurrence (rows without it run on), exactly as if the free text were cut there.
    text0 = free[0]
    start = next(i for i in range(3, len(text0) - 1) if text0[i:i + 2].isascii() and text0[i:i + 2].isalpha())
    marker = text0[start:start + 2]
    model.end_sym = marker
    batched = model.generate(_prompts(), images, max_new_tokens=12)
    for row, full in enumerate(free):
        assert batched[row] == (full.split(marker, 1)[0].strip() if marker in full else full)
    assert len(batched[0]) < len(text0)
    singles = [model.generate([p], images[i: i + 1], max_new_tokens=12)[0] for i, p in enumerate(_prompts())]
    assert batched == singles


def test_prompt_must_contain_one_image_placeholder(tiny_model_factory):
    model = tiny_model_factory("linear")
    with pytest.raises(ValueError, match="exactly once"):
        model.build_generation_text(["no image here"])


def test_projector_init_depends_on_the_seed_alone_not_on_the_backbone_draws(tiny_model_factory, tiny_tokenizer_dir):
    """The projector (σ head, prior: what a fine-tune starts from) draws from the RNG state the build started in:
    a deeper LLM, which draws more random numbers before it, leaves the projector's fresh values unchanged, and
    they equal a projector built alone right after seeding."""
    from minigpt4.common.tiny_models import TINY_LLM
    from minigpt4.models.vib import VIBConfig, build_projector

    shallow = tiny_model_factory("vib", seed=3)
    deeper = tiny_model_factory("vib", seed=3, llm={**TINY_LLM, "num_hidden_layers": 3})
    torch.manual_seed(3)
    alone = build_projector("vib", shallow.encoder.out_dim, shallow.llm.config.hidden_size,
                            VIBConfig(num_samples=3, beta=1e-2, adaptive=True))
    for name, value in shallow.projector.state_dict().items():
        assert torch.equal(value, deeper.projector.state_dict()[name]), name
        assert torch.equal(value, alone.state_dict()[name]), name
    other_seed = tiny_model_factory("vib", seed=4)
    assert not torch.equal(shallow.projector.llama_proj_std.weight, other_seed.projector.llama_proj_std.weight)
