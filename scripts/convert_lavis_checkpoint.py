"""Convert the image-encoder weights once into one safetensors file with ImageEncoder key names.

    python scripts/convert_lavis_checkpoint.py --vit eva_vit_g.pth \
        --qformer blip2_pretrained_flant5xxl.pth --out encoder.safetensors
    python scripts/convert_lavis_checkpoint.py --hf-snapshot /models/blip2-flan-t5-xxl --out encoder.safetensors

The result is checked key by key and shape by shape against a full-size ImageEncoder built on the meta
device (no memory), then written atomically. Load it with
`minigpt4.models.released_weights.load_encoder_weights(encoder, "encoder.safetensors")`: no pickle, no renaming,
no 4 GB of unused LLM weights to read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Runnable as `python scripts/convert_lavis_checkpoint.py` from a checkout without installing the package.
from minigpt4.models.checkpoints import CheckpointError, check_state_dict, save_state_file  # noqa: E402
from minigpt4.models.encoders import ImageEncoder  # noqa: E402
from minigpt4.models.released_weights import (  # noqa: E402
    check_hf_blip2_config,
    read_hf_blip2_snapshot,
    read_lavis_encoder_state,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--qformer", type=Path, help="LAVIS BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth)")
    source.add_argument("--hf-snapshot", type=Path, help="local Hugging Face BLIP-2 snapshot folder")
    parser.add_argument("--vit", type=Path, help="LAVIS EVA ViT-g checkpoint (eva_vit_g.pth); with --qformer")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--num-query-tokens", type=int, default=32)
    parser.add_argument("--vision-config", type=json.loads, default=None,
                        help="JSON overrides of the EVA ViT-g preset, e.g. '{\"image_size\": 364}'")
    parser.add_argument("--qformer-config", type=json.loads, default=None,
                        help="JSON overrides of the BERT-base Q-Former preset")
    args = parser.parse_args(argv)
    if args.hf_snapshot is not None and args.vit is not None:
        parser.error("--vit goes with --qformer; an HF snapshot already holds the ViT")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch.device("meta"):
        encoder = ImageEncoder(args.vision_config, args.qformer_config, args.num_query_tokens)
    try:
        if args.hf_snapshot is not None:
            check_hf_blip2_config(encoder, args.hf_snapshot)
            state = read_hf_blip2_snapshot(args.hf_snapshot)
            source = str(args.hf_snapshot)
        else:
            num_blocks = encoder.vision_model.config.num_hidden_layers
            state = read_lavis_encoder_state(args.vit, args.qformer, num_vit_blocks=num_blocks)
            source = f"{args.vit} + {args.qformer}"
        check_state_dict(encoder.state_dict(), state, what="image encoder", source=source)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_state_file(args.out, state, metadata={"content": "minigpt4 ImageEncoder", "source": source})
    n_params = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {n_params / 1e6:.1f} M values, from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
