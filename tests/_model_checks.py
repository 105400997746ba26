"""Checks shared by the MiniGPT-4 (test_model.py) and LLaVA-1.5 (test_llava.py) model tests."""
from __future__ import annotations

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
    handle = model.llm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    batch = toy_batch()
    model(batch)
    handle.remove()
    embeds, labels = captured["inputs_embeds"], captured["labels"]
    s, b = model.vib.num_samples, 2
    assert embeds.shape[0] == s * b
    mu = model.projector.llama_proj(model.encode_images(batch["image"]))
    single = model.build_training_text([None, None], batch["answer"])
    for row in range(s * b):
        image = row % b  # sample-major: row = s·B + b
        slots = single.image_mask[image]
        assert torch.allclose(embeds[row, : slots.shape[0]][slots], mu[image], atol=1e-5)
        assert torch.equal(labels[row, : single.labels.shape[1]], single.labels[image])
