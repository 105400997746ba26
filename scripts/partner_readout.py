"""Where does the shapes-world co-occurrence hallucination come from: the visual tokens or the language model?

    python scripts/partner_readout.py --answers out/shapes_experiment/base/eval_co_occurrence_probe

For each (anchor, partner) pair, fit a logistic readout "is the partner in the image?" on the projector outputs
(the visual tokens the LLM receives) of the train split of `--train`, then ask it about the trap images of the
probe world's val split (anchor present, partner absent). If the readout mostly says "absent" where the model
itself answers "yes, there is a star", the visual tokens carry what is needed to say no and the bias comes in
after them, in the frozen LLM. The readout is trained on the same biased data, so it can learn the co-occurrence
too: it bounds from above how much of the bias the tokens force, not from below.

With --answers (an evaluate.py output folder of the same model on the probe world) the model's own caption and
POPE counts on the same traps are printed beside the readout.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt4.eval.cooccurrence import partner_traps, world_pairs  # noqa: E402
from minigpt4.shapes.world.qa import ShapesQADataset  # noqa: E402
from minigpt4.shapes.world.scenes import CLASS_NAMES  # noqa: E402


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-yaml", default="assets/shapes_base/model.yaml", help="a file with a model: section")
    parser.add_argument("--train", default="data/shapes_world", help="world whose train split fits the readout")
    parser.add_argument("--probe", default="data/shapes_world_probe", help="world whose val split holds the traps")
    parser.add_argument("--answers", help="evaluate.py output folder of the same model on the probe world")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    import yaml

    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    model = build_model(yaml.safe_load(Path(args.model_yaml).read_text())["model"]).eval()
    result = readout(model, Path(args.train), Path(args.probe))
    model_counts = partner_traps(args.answers, world_pairs(args.probe)) if args.answers else {}
    print(f"{'pair':<16}{'readout val acc':>16}{'readout: present on traps':>28}"
          + (f"{'model caption names it':>25}{'model POPE yes':>16}" if model_counts else ""))
    for partner, r in result.items():
        line = f"{r['anchor'] + ' -> ' + partner:<16}{100 * r['val_accuracy']:15.1f}%" \
               f"{r['readout_present_on_traps']:>21d}/{r['traps']:<6d}"
        if partner in model_counts:
            c = model_counts[partner]
            line += f"{c['caption_named']:>18d}/{c['caption_traps']:<6d}{c['pope_yes']:>9d}/{c['pope_questions']:<6d}"
            r["model"] = c
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
