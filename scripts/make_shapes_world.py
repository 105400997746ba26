"""Generate the shapes world: a small procedural hallucination testbed in COCO's file formats.

    python scripts/make_shapes_world.py --out data/shapes_world [--num-train 3000 --num-val 300 --seed 0]
        [--image-size 64 --cooccurrence 0.9 --val-cooccurrence P --captions-per-image 3] [--overwrite]

The same arguments always give byte-identical files. See minigpt4/shapes/world/scenes.py for the
layout; in short, train a captioner on train_captions.json + images/, score CHAIR with
--coco-annotations <out>/annotations --synonyms <out>/synonyms.txt, and POPE on <out>/pope/*.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from minigpt4.shapes.world.scenes import CAPTION_TEMPLATES, build_shapes_world  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="square images, pixels (>= 32)")
    parser.add_argument("--cooccurrence", type=float, default=0.9,
                        help="P(partner in image | anchor in image) for the paired classes")
    parser.add_argument("--val-cooccurrence", type=float, default=None,
                        help="P(partner | anchor) in the val split only (default: --cooccurrence); 0 makes "
                             "every val anchor a co-occurrence-hallucination trap")
    parser.add_argument("--captions-per-image", type=int, default=3,
                        help=f"distinct caption templates per image (1..{len(CAPTION_TEMPLATES)})")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild into a folder that holds an earlier shapes-world build")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = build_shapes_world(
            args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
            image_size=args.image_size, cooccurrence=args.cooccurrence,
            captions_per_image=args.captions_per_image, overwrite=args.overwrite,
            val_cooccurrence=args.val_cooccurrence,
        )
    except (ValueError, FileExistsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"shapes world: {args.num_train} train + {args.num_val} val images in {elapsed:.1f} s "
          f"-> {paths['root']}")
    for key in sorted(paths):
        if key != "root":
            print(f"  {key:<18} {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
