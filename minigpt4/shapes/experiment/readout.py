"""The visual-token readout of scripts/partner_readout.py: can a logistic readout of the projector's output tell
that the partner of a present anchor is absent, where the model itself says it is there?

For each (anchor, partner) pair of the probe world, a readout "is the partner in the image?" is fitted on the
visual tokens of the train split and asked about the trap images of the probe's val split (anchor present,
partner absent). It is trained on the same biased data, so it can learn the co-occurrence too: it bounds from
above how much of the bias the tokens force, not from below.
"""
from __future__ import annotations

from pathlib import Path

import torch

from minigpt4.eval.cooccurrence import world_pairs
from minigpt4.shapes.world.qa import ShapesQADataset
from minigpt4.shapes.world.scenes import CLASS_NAMES


@torch.no_grad()
def visual_tokens(model, dataset: ShapesQADataset, batch_size: int = 100) -> torch.Tensor:
    """[images, N·d]: the projector's output (z = μ for a VIB) for every image, flattened."""
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.images(range(start, min(start + batch_size, len(dataset))))
        tokens, _ = model.projector(model.encode_images(images))
        chunks.append(tokens.flatten(1).float())
    return torch.cat(chunks)


def fit_readout(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS (deterministic; a few hundred dims, a few thousand rows)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def readout(model, train_world: Path, probe_world: Path) -> dict[str, dict]:
    """{partner: {"val_accuracy", "traps", "readout_present_on_traps"}} for every pair of the probe world."""
    train = ShapesQADataset(train_world, "train", image_size=model.encoder.vision_config.image_size)
    probe = ShapesQADataset(probe_world, "val", image_size=model.encoder.vision_config.image_size)
    x_train, x_probe = visual_tokens(model, train), visual_tokens(model, probe)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_probe = (x_train - mean) / std, (x_probe - mean) / std
    result = {}
    for anchor, partner in world_pairs(probe_world):
        a, p = CLASS_NAMES.index(anchor), CLASS_NAMES.index(partner)
        w, b = fit_readout(x_train, train.objects[:, p])
        says_present = (x_probe @ w + b) > 0
        present = probe.objects[:, p].bool()
        traps = (probe.objects[:, a] == 1) & ~present
        result[partner] = {"anchor": anchor, "val_accuracy": float((says_present == present).float().mean()),
                           "traps": int(traps.sum()), "readout_present_on_traps": int((says_present & traps).sum())}
    return result
