#!/usr/bin/env python
"""How much of AdaVIB's H/log V is the pooled visual token's length, and how much its direction (issue 23).

    python scripts/real_small_entropy.py --out out/real_small/entropy.json \
        --model toy eval_configs/shapes_base.yaml \
        --model real-init eval_configs/real_small_base.yaml model.projector_path=null \
        --model real-base eval_configs/real_small_base.yaml --captions real-base=out/eval/real_small_base

Each --model is a name, an evaluation config and its overrides. Over the config's CHAIR images (eval.chair and its
protocol: the val split of its shapes world), per image: u = Σμᵢ/√N of the projector's mean output (models/vib.py
`pool_tokens`, as α is computed in training), then
  * H/log V of softmax(u·Eᵀ) and α = −log(H/log V): the paper's formula (minigpt4/models/vib.py);
  * ‖u‖, beside the mean length of the LLM's word embeddings;
  * H/log V with u rescaled to that mean word length (`model.vib.entropy_of: length_free`, not the paper's);
  * the vocabulary entry softmax(u·Eᵀ) puts most mass on, and how many images share the most common one.
Writes --out (JSON: per image and a summary per model) and prints a Markdown table of mean ± std [min, max].
With --captions NAME=EVAL_DIR (an evaluate.py folder that captioned the same images), also Figure 1 for that
model: both H/log V against the CHAIR verdicts, with 95 % bootstrap intervals over images.
A random projector (`model.projector_path=null`) is drawn with torch seed 0.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("real_small_entropy")
MEASURES = ("entropy_ratio", "alpha", "u_norm", "length_free_entropy_ratio", "length_free_alpha")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", nargs="+", required=True, metavar="NAME CONFIG [KEY=VALUE ...]",
                    help="a model: its name, its evaluation config, then overrides (repeat for more models)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--max-images", type=int, default=None, help="the first N CHAIR images only (default: all)")
    ap.add_argument("--captions", action="append", default=[], metavar="NAME=EVAL_DIR",
                    help="Figure 1 for model NAME: its per-image H/log V, the paper's and the length-free one, "
                         "against the CHAIR verdicts of an evaluate.py folder of the same images (repeatable)")
    args = ap.parse_args(argv)
    for pair in args.captions:
        if "=" not in pair or pair.split("=", 1)[0] not in {model[0] for model in args.model}:
            ap.error(f"--captions {pair!r}: expected NAME=EVAL_DIR with NAME one of the --model names")
    if any(len(model) < 2 for model in args.model):
        ap.error("--model needs a name and an evaluation config")
    names = [model[0] for model in args.model]
    if len(set(names)) != len(names):
        ap.error(f"--model: each name once, got {names}")
    return args


def per_image(model, images) -> dict[str, list]:
    """The measures of one batch of processed images, each a list over the images."""
    import torch

    from minigpt4.models.vib import adaptive_weight, pool_tokens, rescaled_to_word_length, similarity_entropy

    with torch.no_grad():
        tokens = model.generation_visual_tokens(model.encode_images(images))  # μ, the projection in eval mode
        u = pool_tokens(tokens.float())
        embed = model.embed_weight
        vocab = embed.shape[0]
        entropy = similarity_entropy(u, embed)
        free = similarity_entropy(rescaled_to_word_length(u, embed), embed)
        top = torch.cat([(rows @ embed.float().T).argmax(-1) for rows in u.split(64)])
    return {"entropy_ratio": (entropy / math.log(vocab)).tolist(), "alpha": adaptive_weight(entropy, vocab).tolist(),
            "u_norm": torch.linalg.vector_norm(u, dim=-1).tolist(),
            "length_free_entropy_ratio": (free / math.log(vocab)).tolist(),
            "length_free_alpha": adaptive_weight(free, vocab).tolist(),
            "top_token": [model.tokenizer.convert_ids_to_tokens(int(i)) for i in top]}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values), "n": len(values)}


def measure_model(config: str, overrides: list[str], max_images: int | None) -> dict:
    import torch
    from omegaconf import OmegaConf

    from minigpt4.eval.benchmark_runs import ImageLoader, chair_items
    from minigpt4.eval.eval_config import load_eval_config
    from minigpt4.eval.protocol_runs import protocol_runs
    from minigpt4.models.from_config import build_model
    from minigpt4.models.vib import mean_word_length

    cfg = load_eval_config(config, overrides)
    settings = OmegaConf.to_object(cfg.eval)
    items = chair_items(settings, protocol_runs(settings, cfg.model.prompt_template)["chair"])[:max_images]
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    loader, rows, keys = ImageLoader(settings), {}, []
    for start in range(0, len(items), settings.batch_size):
        batch = [(item, loader(item.image)) for item in items[start:start + settings.batch_size]]
        batch = [(item, tensor) for item, tensor in batch if tensor is not None]
        if batch:
            keys += [str(item.extra["image_id"]) for item, _ in batch]
            for key, values in per_image(model, torch.stack([tensor for _, tensor in batch])).items():
                rows.setdefault(key, []).extend(values)
    if not keys:
        raise ValueError(f"{config}: none of its {len(items)} CHAIR images could be read")
    embed = model.embed_weight.float()
    common, count = Counter(rows["top_token"]).most_common(1)[0]
    return {"config": config, "options": overrides, "images": keys, "vocab_size": int(embed.shape[0]),
            "word_length_mean": float(mean_word_length(embed)), "per_image": rows,
            "summary": {key: summary(rows[key]) for key in MEASURES},
            "top_token": {"most_common": common, "images": count, "of": len(keys)}}


def markdown(result: dict) -> str:
    head = ("| model | V | H/log V | α | ‖u‖ (word: mean length) | H/log V, u at word length | α, length-free | "
            "top-1 entry (images) |\n|---|---|---|---|---|---|---|---|")
    cell = lambda s: f"{s['mean']:.4g} ± {s['std']:.2g} [{s['min']:.4g}, {s['max']:.4g}]"  # noqa: E731
    lines = [head]
    for name, m in result["models"].items():
        s, top = m["summary"], m["top_token"]
        lines.append(f"| {name} | {m['vocab_size']} | {cell(s['entropy_ratio'])} | {cell(s['alpha'])} | "
                     f"{cell(s['u_norm'])} ({m['word_length_mean']:.3g}) | {cell(s['length_free_entropy_ratio'])} | "
                     f"{cell(s['length_free_alpha'])} | {top['most_common']!r} ({top['images']}/{top['of']}) |")
    return "\n".join(lines)


def figure1(measured: dict, name: str, eval_dir: str) -> dict[str, dict]:
    """Spearman ρ, AUC and the rest (minigpt4.eval.entropy_correlation, bootstrap over images) of the paper's
    H/log V and of the length-free one against the CHAIR verdicts in `eval_dir`."""
    from minigpt4.eval.entropy_correlation import eval_dir_correlation

    rows = measured["per_image"]
    entropy = {"images": measured["images"], "vocab_size": measured["vocab_size"],
               "models": {"paper": {"entropy_ratio": rows["entropy_ratio"]},
                          "length-free": {"entropy_ratio": rows["length_free_entropy_ratio"]}}}
    return {f"{name}, {kind} H/log V": eval_dir_correlation(eval_dir, entropy, kind)[0]
            for kind in ("paper", "length-free")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.jsonfiles import write_json

    result: dict = {"models": {}}
    try:
        for name, config, *overrides in args.model:
            result["models"][name] = measure_model(config, overrides, args.max_images)
            log.info("%s: H/log V mean %.4g", name, result["models"][name]["summary"]["entropy_ratio"]["mean"])
        if args.captions:
            result["figure1"] = {}
            for pair in args.captions:
                name, eval_dir = pair.split("=", 1)
                result["figure1"].update(figure1(result["models"][name], name, eval_dir))
    except (ValueError, OSError, *USER_FACING_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(args.out, result, indent=1)
    print(markdown(result))
    if args.captions:
        from minigpt4.eval.entropy_correlation import figure1_table

        print("\n" + figure1_table({label: [r] for label, r in result["figure1"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
