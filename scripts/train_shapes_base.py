"""Train the stage-0 shapes-world base model: a tiny MiniGPT-4 that captions shapes and answers yes/no.

    python scripts/train_shapes_base.py        # defaults: --data data/shapes_world_base_train
                                               #   --out assets/shapes_base --steps 6000 --lr 5e-4 --seed 0

Same classes as the real model (BLIP-2 ViT + Q-Former + query tokens -> linear projector -> LlamaForCausalLM),
built by `minigpt4.models.from_config.build_model` at a width two CPU cores train in about a quarter of an hour.
Unlike the real model nothing is pre-trained, so everything trains end to end, on captions ("Describe this
image.") mixed with POPE-style object questions (minigpt4.shapes.world.qa), in the vicuna_v0 template,
plus an object-presence loss on the Q-Former outputs through a linear probe that is thrown away afterwards
(`ObjectProbe`: without it the from-scratch ViT needs several times longer).

Data: its own shapes world (TRAIN_WORLD, generated into --data if missing): the generator parameters of the
evaluation world (`scripts/make_shapes_world.py` defaults: same classes, co-occurrence, captions), but seed 1
and 15000 training images. On the evaluation world's 3000 the ViT overfits long before it sees shapes well;
a different seed keeps every evaluation image (seed 0) unseen. Its own 300 val images are the dev set checked
during training; the evaluation world's val split is left to `evaluate.py`.

Writes to --out: tokenizer/ (byte-level BPE trained on the training text), model.safetensors (the whole model:
encoder.*, llm.*, projector.*), model.yaml (the `model:` config section that rebuilds it; paths relative to the
repository root when --out is inside it) and train_log.json (loss curve, wall time, a quick val check). The
training itself is minigpt4/shapes/experiment/base_model.py.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from minigpt4.shapes.experiment.base_model import train_base_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/shapes_world_base_train",
                    help="training shapes world (TRAIN_WORLD; generated if missing)")
    ap.add_argument("--out", default="assets/shapes_base")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak lr (a from-scratch ViT stalls at 2e-3)")
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--question-fraction", type=float, default=0.4, help="share of yes/no question examples")
    ap.add_argument("--probe-weight", type=float, default=1.0, help="weight of the object-presence loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="of the saved weights")
    ap.add_argument("--val-images", type=int, default=100, help="val images captioned for the final check")
    ap.add_argument("--val-every", type=int, default=0,
                    help="also check every N steps, a multiple of 100 (0: only at the end)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = train_base_model(args)
    print(json.dumps({k: summary[k] for k in ("train_seconds", "final_loss", "quick_val")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
