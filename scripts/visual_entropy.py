#!/usr/bin/env python
"""H/log V of the pooled visual tokens of every CHAIR image of an evaluation config, for one or more models.

    python scripts/visual_entropy.py --cfg-path eval_configs/shapes_base.yaml --out out/entropy.json \
        --model base --model AdaVIB model.mm_projector_type=vib model.ckpt=out/shapes/adavib/final/trainable.safetensors

Each --model is a name and the `model.*` overrides evaluate.py would get for it; --options are overrides for all
of them (eval.* paths of another world, ...). The images are exactly those CHAIR captions under the config
(eval.chair and its protocol, eval.image_dir, eval.vis_processor). For each image and model: the projector's mean
output μ, pooled over the tokens, against the LLM's input embeddings, H/log V = entropy of softmax(u · Eᵀ) / log V
with the functions AdaVIB's α is computed by in training (minigpt4/models/vib.py, via
minigpt4/models/visual_diagnostics.py).
Writes --out (JSON): {"images": [image key, ...], "vocab_size", "models": {name: {"options", "entropy_ratio": [...]}},
"skipped": [unreadable image paths]}, in one piece once every model is done.
minigpt4/eval/entropy_correlation.py relates it to CHAIR's per-caption verdicts (scripts/shapes_experiment.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("visual_entropy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", required=True, help="evaluation YAML (model: and eval: sections)")
    ap.add_argument("--model", action="append", nargs="+", required=True, metavar="NAME [KEY=VALUE ...]",
                    help="a model: its name, then its model.* overrides (repeat for more models)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--options", nargs="*", default=[], help="overrides for every model, e.g. eval.image_dir=...")
    args = ap.parse_args(argv)
    names = [model[0] for model in args.model]
    if len(set(names)) != len(names):
        ap.error(f"--model: each name once, got {names}")
    for name, *overrides in args.model:
        wrong = [o for o in overrides if not o.startswith("model.") or "=" not in o]
        if wrong:
            ap.error(f"--model {name}: overrides must be model.KEY=VALUE, got {wrong}")
    return args


def entropy_ratios(model, items, loader, batch_size: int) -> tuple[list[str], list[float], list[str]]:
    """(image keys, H/log V, skipped paths) over `items` (GenerationItem), `batch_size` images at a time."""
    import torch

    from minigpt4.models.visual_diagnostics import entropy_stats, pooled_visual_tokens

    keys, ratios, skipped = [], [], []
    for start in range(0, len(items), batch_size):
        tensors = []
        for item in items[start:start + batch_size]:
            tensor = loader(item.image)  # None: unreadable and eval.on_bad_image is skip (CHAIR skips it too)
            if tensor is None:
                skipped.append(item.image)
                continue
            tensors.append(tensor)
            keys.append(str(item.extra["image_id"]))
        if tensors:
            with torch.no_grad():
                pooled = pooled_visual_tokens(model, model.encode_images(torch.stack(tensors)))
                ratios += entropy_stats(pooled, model.embed_weight)[0].tolist()
    return keys, ratios, skipped


def measure(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from minigpt4.eval.benchmark_runs import ImageLoader, chair_items
    from minigpt4.eval.eval_config import load_eval_config
    from minigpt4.eval.protocol_runs import protocol_runs
    from minigpt4.models.from_config import build_model

    result: dict = {"config": args.cfg_path, "options": args.options, "models": {}}
    for name, *overrides in args.model:
        cfg = load_eval_config(args.cfg_path, [*args.options, *overrides])
        settings = OmegaConf.to_object(cfg.eval)
        items = chair_items(settings, protocol_runs(settings, cfg.model.prompt_template)["chair"])
        model = build_model(cfg.model).eval()
        keys, ratios, skipped = entropy_ratios(model, items, ImageLoader(settings), settings.batch_size)
        if not keys:
            raise ValueError(f"none of the {len(items)} CHAIR images could be read ({skipped[:3]} ...)")
        if result.get("images", keys) != keys:  # --model overrides that change the image set: not comparable
            raise ValueError(f"--model {name}: its CHAIR images differ from those of the models before it")
        result.update(images=keys, skipped=skipped, vocab_size=int(model.embed_weight.shape[0]))
        result["models"][name] = {"options": overrides, "entropy_ratio": ratios}
        log.info("%s: H/log V over %d images: mean %.4f, %.4f-%.4f", name, len(ratios), sum(ratios) / len(ratios),
                 min(ratios), max(ratios))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.jsonfiles import write_json

    try:
        result = measure(args)
    except (ValueError, *USER_FACING_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(args.out, result, indent=1)  # atomic: a killed run leaves no file that looks finished
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
