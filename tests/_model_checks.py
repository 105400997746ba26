"""Checks shared by the MiniGPT-4 (test_model.py) and LLaVA-1.5 (test_llava.py) model tests."""
from __future__ import annotations

from unittest import mock

import torch


def toy_batch(b: int = 2, size: int = 28) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "answer": ["a dog on the grass", "two cats sleeping on a sofa in the living room"][:b],
        "instruction": [None] * b,
    }


def assert_sample_major_pairing(model) -> None:
    """Row s·B + b of the LLM input holds image b's visual tokens (μ: the caller made σ ≈ 0) and image b's
    labels, for every noise sample s: the S copies of the text are repeated in the projector's order."""
    captured = {}
    answer_cross_entropy = model.answer_cross_entropy

    def capture(embeds, text):
        captured.update(embeds=embeds, labels=text.labels)
        return answer_cross_entropy(embeds, text)

    batch = toy_batch()
    with mock.patch.object(model, "answer_cross_entropy", capture):
        model(batch)
    embeds, labels = captured["embeds"], captured["labels"]
    s, b = model.vib.num_samples, 2
    assert embeds.shape[0] == s * b
    mu = model.projector.llama_proj(model.encode_images(batch["image"]))
    single = model.build_training_text([None, None], batch["answer"])
    for row in range(s * b):
        image = row % b  # sample-major: row = s·B + b
        slots = single.image_mask[image]
        assert torch.allclose(embeds[row, : slots.shape[0]][slots], mu[image], atol=1e-5)
        assert torch.equal(labels[row, : single.labels.shape[1]], single.labels[image])


def caption_recall_on_val(model, world, image_size: int) -> dict:
    """CHAIR's result for `model`'s greedy captions of a shapes world's val images (the captioning check of both
    committed base models, tests/test_shapes_base.py and tests/test_real_small_base.py)."""
    from minigpt4.eval.chair import CHAIRScorer, build_ground_truth, score_captions
    from minigpt4.shapes.world.qa import CAPTION_INSTRUCTION, ShapesQADataset

    val = ShapesQADataset(world, "val", image_size=image_size)
    prompt = model.template.prompt(CAPTION_INSTRUCTION)
    captions = model.generate([prompt] * len(val), val.images(range(len(val))), max_new_tokens=48)
    scorer = CHAIRScorer(world / "synonyms.txt")
    gt = build_ground_truth(world / "annotations", scorer=scorer)
    rows = [{"image_id": i, "caption": c} for i, c in zip(val.image_ids, captions, strict=True)]
    return score_captions(rows, gt, scorer=scorer)
