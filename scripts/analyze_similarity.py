#!/usr/bin/env python
"""Plots behind AdaVIB's motivation: how peaked the visual tokens' similarity to the vocabulary is.

    python scripts/analyze_similarity.py --images data/shapes_world/images --out out/analysis
    python scripts/analyze_similarity.py --cfg-path eval_configs/minigpt4_7b_original.yaml --options ... \
        --compare-ckpt out/adavib_minigpt4_7b/final/trainable.safetensors \
        --images data/coco/val2014 --max-images 500 --out out/analysis \
        --metrics out/adavib_minigpt4_7b/metrics.jsonl

Writes into --out:
  similarity_distribution.png  softmax(u·Eᵀ) of the pooled visual tokens, sorted, log scale, for a few images
                               (solid: base projector, dashed: --compare-ckpt), with the uniform 1/V for scale
  entropy_hist.png             H/log V and α = -log(H/log V) over the image set, base and compare overlaid
  training_curves.png          ce, kl_term (β·KL), alpha (and entropy_ratio, sigma when logged) from --metrics
  similarity_summary.json      the per-image numbers behind the plots
No --cfg-path: the demo's default model (assets/shapes_base/model.yaml if present, else a tiny random one).
Unreadable images are skipped and counted (logged); --images and --metrics are each optional, not both.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

log = logging.getLogger("analyze_similarity")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CURVE_KEYS = ("ce", "kl_term", "alpha", "entropy_ratio", "sigma")


# ----------------------------------------------------------------------------------------------- inputs
def list_images(folder: Path, limit: int | None) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: not a folder: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return paths[:limit] if limit else paths


def read_metrics_file(path: Path) -> list[dict]:
    """JSON lines; blank lines skipped; a torn last line (a run killed mid-write) ignored; any other bad line
    is an error naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"--metrics: file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s:%d: ignoring an incomplete last line", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------- compute
def similarity_over_images(models: dict, processor, paths: list[Path], *, batch_size: int, num_examples: int):
    """Per projector: H/log V and α per usable image, and sorted similarity distributions of the first
    `num_examples` images. Returns (stats, used image names, number skipped)."""
    import torch

    from minigpt4.common.images import BadImageError, load_rgb
    from minigpt4.models.visual_diagnostics import entropy_stats, pooled_visual_tokens, similarity_probs

    base = next(iter(models.values()))
    stats = {name: {"entropy_ratio": [], "alpha": [], "sorted_probs": []} for name in models}
    used, skipped = [], 0
    for start in range(0, len(paths), batch_size):
        tensors = []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(processor(load_rgb(path)))
                used.append(path.name)
            except BadImageError as err:
                skipped += 1
                log.warning("skipping %s (%d skipped so far)", err, skipped)
        if not tensors:
            continue
        with torch.no_grad():
            features = base.encode_images(torch.stack(tensors))  # the frozen encoder is shared: encode once
            for name, model in models.items():
                pooled = pooled_visual_tokens(model, features)
                ratio, alpha = entropy_stats(pooled, model.embed_weight)
                stats[name]["entropy_ratio"] += ratio.tolist()
                stats[name]["alpha"] += alpha.tolist()
                wanted = num_examples - len(stats[name]["sorted_probs"])
                if wanted > 0:
                    probs = similarity_probs(pooled[:wanted], model.embed_weight)
                    stats[name]["sorted_probs"] += probs.sort(dim=-1, descending=True).values.cpu().unbind(0)
    return stats, used, skipped


# ----------------------------------------------------------------------------------------------- plots
def plot_similarity_distribution(stats: dict, names: list[str], vocab: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ranks = range(1, vocab + 1)
    for m, (label, s) in enumerate(stats.items()):
        for i, probs in enumerate(s["sorted_probs"]):
            ax.plot(ranks, probs.numpy(), styles[m % len(styles)], color=colours[i % len(colours)], lw=1.2,
                    label=f"{names[i]} ({label})")
    ax.axhline(1.0 / vocab, color="grey", lw=0.8, label=f"uniform 1/V (V={vocab})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary rank")
    ax.set_ylabel("softmax(u·Eᵀ) probability")
    ax.set_title("Similarity of pooled visual tokens to the LLM vocabulary")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_entropy_hist(stats: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, xlabel in (("entropy_ratio", axes[0], "H / log V"), ("alpha", axes[1], "α = −log(H / log V)")):
        values = [v for s in stats.values() for v in s[key]]
        low, high = min(values), max(values)
        span = high - low or max(abs(high), 1e-3) * 0.01
        bins = [low - 0.05 * span + i * 1.1 * span / 30 for i in range(31)]
        for label, s in stats.items():
            mean = sum(s[key]) / len(s[key])
            ax.hist(s[key], bins=bins, alpha=0.55, label=f"{label} (mean {mean:.4g}, n={len(s[key])})")
            ax.axvline(mean, color="black", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("images")
        ax.ticklabel_format(axis="x", useOffset=False)  # near-identical values: print them, not an offset
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.tick_params(axis="x", labelrotation=20)
        ax.legend(fontsize=8)
    fig.suptitle("Normalised similarity entropy over the image set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(records: list[dict], path: Path) -> list[str]:
    """One panel per logged key of CURVE_KEYS; returns the keys drawn. Null (non-finite) values are left out."""
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) and "step" in r for r in records)]
    if not keys:
        raise ValueError(f"no record has a step and any of {', '.join(CURVE_KEYS)}")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records
                  if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_ylabel({"kl_term": "β·KL"}.get(key, key))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return keys


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", help="YAML whose model: section is analysed (default: the demo's default model)")
    ap.add_argument("--options", nargs="*", default=[], help="model overrides, e.g. model.llm_path=...")
    ap.add_argument("--compare-ckpt", help="second projector (trainable.safetensors) to overlay")
    ap.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    ap.add_argument("--max-images", type=int, default=None, help="use at most this many (sorted by path)")
    ap.add_argument("--num-examples", type=int, default=4, help="images drawn in the similarity plot")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--metrics", type=Path, help="a run's metrics.jsonl for the training curves")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--gpu-id", type=int, default=0, help="CUDA device index; CPU without CUDA or with -1")
    args = ap.parse_args(argv)
    if args.images is None and args.metrics is None:
        ap.error("give --images (similarity plots), --metrics (training curves), or both")
    if args.batch_size < 1 or args.num_examples < 0:
        ap.error("--batch-size must be >= 1 and --num-examples >= 0")
    return args


def analyse_images(args: argparse.Namespace) -> dict:
    import torch

    from minigpt4.common.config_files import load_model_config
    from minigpt4.demo import loading
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)  # random-init parts of a tiny default model: the same numbers every run
    if args.cfg_path:
        cfg = load_model_config(args.cfg_path, args.options)
    else:
        cfg = loading.default_model_config()
    vis_processor, _ = loading.demo_extras(args.cfg_path)
    model = build_model(cfg, device=loading.resolve_device(args.gpu_id)).eval()
    models = {"base": model}
    if args.compare_ckpt:
        models[Path(args.compare_ckpt).name] = loading.with_projector_checkpoint(model, args.compare_ckpt)
    paths = list_images(args.images, args.max_images)
    stats, used, skipped = similarity_over_images(models, loading.image_processor_for(model, vis_processor), paths,
                                                  batch_size=args.batch_size, num_examples=args.num_examples)
    if not used:
        raise ValueError(f"--images {args.images}: no usable image among {len(paths)} files ({skipped} unreadable)")
    if skipped:
        log.warning("skipped %d of %d image files (unreadable)", skipped, len(paths))
    vocab = model.embed_weight.shape[0]
    if args.num_examples:
        plot_similarity_distribution(stats, used, vocab, args.out / "similarity_distribution.png")
    plot_entropy_hist(stats, args.out / "entropy_hist.png")
    return {
        "model": loading.describe_model(cfg), "vocab_size": vocab, "images": used, "skipped": skipped,
        "projectors": {name: {"entropy_ratio": s["entropy_ratio"], "alpha": s["alpha"],
                              "mean_entropy_ratio": sum(s["entropy_ratio"]) / len(used),
                              "mean_alpha": sum(s["alpha"]) / len(used)} for name, s in stats.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from minigpt4.common.config import ConfigError
    from minigpt4.models.checkpoints import CheckpointError

    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    try:
        if args.images is not None:
            summary.update(analyse_images(args))
        if args.metrics is not None:
            summary["curves"] = plot_training_curves(read_metrics_file(args.metrics), args.out / "training_curves.png")
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(args.out / "similarity_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log.info("wrote %s", ", ".join(sorted(os.listdir(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
