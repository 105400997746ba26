#!/usr/bin/env python
"""Build the tiny CPU recipe's inputs, offline, in a few seconds (idempotent):

    python scripts/prepare_tiny.py [--out data/tiny]

  data/tiny/world/      a small shapes world (200 train / 40 val images, COCO/POPE formats)
  data/tiny/tokenizer/  a byte-level BPE tokenizer trained on its captions (LLaMA special tokens)
"""
from __future__ import annotations

import argparse
import json
import os

from minigpt4.common.tiny_models import DEFAULT_CORPUS, train_tokenizer  # noqa: E402
from minigpt4.shapes.world.scenes import build_shapes_world  # noqa: E402


def prepare(out: str, num_train: int = 200, num_val: int = 40, seed: int = 0) -> None:
    """Build the world and train the tokenizer unless they exist already."""
    world = os.path.join(out, "world")
    if not os.path.exists(os.path.join(world, "meta.json")):
        build_shapes_world(world, num_train=num_train, num_val=num_val, seed=seed)
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        with open(os.path.join(world, "train_captions.json"), encoding="utf-8") as f:
            captions = [row["caption"] for row in json.load(f)]
        train_tokenizer(tok_dir, captions + DEFAULT_CORPUS, vocab_size=400)
    print(f"tiny data ready in {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny")
    args = ap.parse_args(argv)
    prepare(args.out)


if __name__ == "__main__":
    main()
