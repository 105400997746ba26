"""The AdaVIB paper's Figure 1 as a measurement: does the smoothness of the visual tokens' similarity to the
vocabulary go with hallucination?

Per image, H/log V is the normalised entropy of softmax(u · Eᵀ), u the pooled visual tokens, E the LLM's
input embeddings: the quantity AdaVIB's α = −log(H/log V) is made of (minigpt4/models/vib.py; computed per
image by scripts/visual_entropy.py with those functions). Per caption, "hallucinates" is CHAIR's per-caption
verdict: at least one mentioned object is not in the image (the rows CHAIR_S counts; minigpt4/eval/chair.py
stores them under "per_caption"). This module relates the two:

- Spearman's rank correlation ρ between H/log V and the 0/1 hallucination flag (ties share their mean rank),
- the point-biserial correlation (Pearson's r of H/log V with the flag),
- the AUC: P(H/log V of a hallucinating caption > that of a clean one), ties counting one half. 0.5 is no
  association; below 0.5 hallucinating captions come with lower H/log V, i.e. more peaked distributions,

each with a percentile bootstrap interval over images (minigpt4/eval/bootstrap.py: the same multinomial image
draws as every other interval of this harness). A resample is a weighting of the rows by how often their image
was drawn, and every statistic here is computed on the weighted sample exactly as on the expanded one.

Direction: AdaVIB's α = −log(H/log V) is largest where H/log V is smallest (a peaked distribution, which the
method treats as over-confident), so its adaptive weight aims at hallucination there: ρ < 0, AUC < 0.5. A
positive ρ is an association too ("smoothness correlates with hallucination"), but at the end α weights least.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from minigpt4.eval.bootstrap import resample_totals
from minigpt4.eval.paired import image_key

STATISTICS = ("spearman", "point_biserial", "auc")


def weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of `values` (n,) in the sample where row i appears weights[..., i] times.

    weights: (n,) or (R, n) of non-negative counts; returns ranks of the same shape. Equal values share the
    mean of the ranks they occupy, as in Spearman's and the Mann-Whitney statistic's tie rule.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    distinct, group = np.unique(values, return_inverse=True)
    members = np.zeros((values.shape[0], distinct.shape[0]))
    members[np.arange(values.shape[0]), group] = 1.0
    group_weight = weights @ members  # (..., groups), in increasing order of value
    below = np.cumsum(group_weight, axis=-1) - group_weight
    group_rank = below + (group_weight + 1.0) / 2.0
    return group_rank[..., group]


def weighted_pearson(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pearson's r of a and b over the last axis, row i counted weights[..., i] times; NaN where a or b is
    constant on the weighted sample (the correlation is undefined there)."""
    total = weights.sum(axis=-1, keepdims=True)
    da = a - (weights * a).sum(axis=-1, keepdims=True) / total
    db = b - (weights * b).sum(axis=-1, keepdims=True) / total
    covariance = (weights * da * db).sum(axis=-1)
    var_a, var_b = (weights * da * da).sum(axis=-1), (weights * db * db).sum(axis=-1)
    # A constant column has variance 0 up to rounding: undefined, rather than a ratio of rounding noise.
    defined = (var_a > 1e-12 * (weights * a * a).sum(axis=-1)) & (var_b > 1e-12 * (weights * b * b).sum(axis=-1))
    spread = np.where(defined, var_a * var_b, 1.0)
    return np.where(defined, covariance / np.sqrt(spread), np.nan)


def correlation_statistics(ratio: np.ndarray, hallucinated: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman ρ, point-biserial r and AUC of H/log V against the 0/1 flag on the weighted sample.

    ratio, hallucinated: (n,); weights: (n,) or (R, n). NaN where a statistic is undefined (no hallucinating
    or no clean caption drawn, or H/log V constant)."""
    flag = np.asarray(hallucinated, dtype=np.float64)
    ratio = np.asarray(ratio, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    ratio_rank = weighted_ranks(ratio, weights)
    positives = (weights * flag).sum(axis=-1)
    negatives = (weights * (1.0 - flag)).sum(axis=-1)
    # Mann-Whitney U of the hallucinating rows from their rank sum; AUC = U / (n₊ n₋).
    rank_sum = (weights * flag * ratio_rank).sum(axis=-1)
    pairs = positives * negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, (rank_sum - positives * (positives + 1.0) / 2.0) / np.where(pairs > 0, pairs, 1.0),
                       np.nan)
    return {
        "spearman": weighted_pearson(ratio_rank, weighted_ranks(flag, weights), weights),
        "point_biserial": weighted_pearson(np.broadcast_to(ratio, weights.shape), np.broadcast_to(flag, weights.shape),
                                           weights),
        "auc": auc,
    }


def _as_float(value: np.ndarray) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def entropy_hallucination_correlation(ratio: Sequence[float], hallucinated: Sequence[bool],
                                      images: Sequence[object], n_resamples: int = 1000, seed: int = 0,
                                      level: float = 0.95) -> dict:
    """The three statistics with percentile bootstrap intervals, resampling `images` (one entry per row; rows
    of one image move together).

    Returns {"n_captions", "n_images", "n_hallucinated", "entropy_ratio": {min, max, mean, std,
    mean_hallucinated, mean_clean}, "<statistic>": {"value", "ci", "undefined_resamples"}, "bootstrap":
    {"unit", "method", "n_resamples", "seed", "level"}}. A value is None where it is undefined (every caption
    hallucinates, or none, or H/log V is the same everywhere); an interval is taken over the resamples where it
    is defined, and None if none is.
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    flag = np.asarray(hallucinated, dtype=bool)
    if ratio.ndim != 1 or ratio.shape != flag.shape or len(images) != ratio.shape[0]:
        raise ValueError(f"need one H/log V, flag and image per caption; got {ratio.shape}, {flag.shape}, "
                         f"{len(images)}")
    if ratio.shape[0] == 0:
        raise ValueError("no captions to correlate")
    if not np.all(np.isfinite(ratio)):
        raise ValueError(f"H/log V must be finite; got {int((~np.isfinite(ratio)).sum())} non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    point = correlation_statistics(ratio, flag, np.ones_like(ratio))
    # Resampled weights: how often each row's image was drawn (the bootstrap's totals of one-hot rows).
    drawn = resample_totals(np.eye(ratio.shape[0]), list(images), n_resamples=n_resamples, seed=seed)
    resampled = correlation_statistics(ratio, flag, drawn)
    tail = (1.0 - level) / 2.0 * 100.0
    result: dict = {
        "n_captions": int(ratio.shape[0]), "n_images": len(set(images)), "n_hallucinated": int(flag.sum()),
        "entropy_ratio": {"min": float(ratio.min()), "max": float(ratio.max()), "mean": float(ratio.mean()),
                          "std": float(ratio.std()),
                          "mean_hallucinated": float(ratio[flag].mean()) if flag.any() else None,
                          "mean_clean": float(ratio[~flag].mean()) if (~flag).any() else None},
        "bootstrap": {"unit": "image", "method": "percentile", "n_resamples": n_resamples, "seed": seed,
                      "level": level},
    }
    for name in STATISTICS:
        values = resampled[name][~np.isnan(resampled[name])]
        ci = [float(v) for v in np.percentile(values, [tail, 100.0 - tail])] if values.size else None
        result[name] = {"value": _as_float(point[name]), "ci": ci,
                        "undefined_resamples": int(n_resamples - values.size)}
    return result


def hallucination_by_bin(ratio: Sequence[float], hallucinated: Sequence[bool], n_bins: int = 5) -> list[dict]:
    """Hallucination rate in `n_bins` bins of H/log V holding as many captions each as possible (fewer bins
    when there are fewer captions): [{"low", "high", "mean_entropy_ratio", "n", "hallucinated", "rate"}] in
    increasing order of H/log V."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    ratio = np.asarray(ratio, dtype=np.float64)
    flag = np.asarray(hallucinated, dtype=bool)
    order = np.argsort(ratio, kind="stable")
    bins = []
    for part in np.array_split(order, min(n_bins, ratio.shape[0])):
        bins.append({"low": float(ratio[part].min()), "high": float(ratio[part].max()),
                     "mean_entropy_ratio": float(ratio[part].mean()), "n": int(part.size),
                     "hallucinated": int(flag[part].sum()), "rate": float(flag[part].mean())})
    return bins


def caption_rows(chair_result: Mapping, entropy_by_image: Mapping[str, float],
                 source: str = "chair.json") -> tuple[list[float], list[bool], list[str]]:
    """(H/log V, hallucinates, image key) per caption of a scored CHAIR result (its per_caption rows), H/log V
    looked up by image key (minigpt4.eval.paired.image_key). A caption whose image has no H/log V is an error
    naming the image: the two files then come from different image sets."""
    rows = chair_result.get("per_caption")
    if not rows:
        raise ValueError(f"{source}: no per_caption rows (score with minigpt4.eval.chair, which writes them)")
    ratio, flags, images = [], [], []
    for row in rows:
        key = image_key(row["image_id"])
        if key not in entropy_by_image:
            raise ValueError(f"{source}: image {row['image_id']} has no H/log V (the entropy file covers "
                             f"{len(entropy_by_image)} other images)")
        ratio.append(float(entropy_by_image[key]))
        flags.append(bool(row["hallucinated"]))
        images.append(key)
    return ratio, flags, images


def eval_dir_correlation(eval_dir: str | Path, entropy: Mapping, model: str) -> tuple[dict, list[float], list[bool]]:
    """The correlation (with its H/log V bins) of one evaluate.py output folder's CHAIR captions with `model`'s
    H/log V in `entropy` (a scripts/visual_entropy.py file, loaded); also the per-caption values it is made of."""
    path = Path(eval_dir) / "chair.json"
    by_image = dict(zip(entropy["images"], entropy["models"][model]["entropy_ratio"], strict=True))
    ratio, flags, images = caption_rows(json.loads(path.read_text(encoding="utf-8")), by_image, source=str(path))
    result = entropy_hallucination_correlation(ratio, flags, images)
    result.update(model=model, eval_dir=str(eval_dir), vocab_size=entropy["vocab_size"],
                  bins=hallucination_by_bin(ratio, flags))
    return result, ratio, flags


def verdict(result: Mapping) -> str:
    """One sentence saying what `result` (entropy_hallucination_correlation) shows, from its numbers."""
    rho = result["spearman"]
    if rho["value"] is None:
        return (f"undefined: {result['n_hallucinated']} of {result['n_captions']} captions hallucinate and H/log V "
                f"spans {result['entropy_ratio']['min']:.4g}-{result['entropy_ratio']['max']:.4g}")
    if rho["ci"] is None:
        return f"ρ = {rho['value']:+.3f}, with no interval: it is undefined in every resample"
    low, high = rho["ci"]
    shown = f"ρ = {rho['value']:+.3f} [{low:+.3f}, {high:+.3f}]"
    if low > 0:
        return (f"{shown}: hallucinating captions come with higher H/log V (smoother similarity), the end where "
                "AdaVIB's α is smallest")
    if high < 0:
        return (f"{shown}: hallucinating captions come with lower H/log V (more peaked similarity), the end where "
                "AdaVIB's α is largest")
    return f"{shown}: the interval includes 0, so no association is measured at this sample size"


# ------------------------------------------------------------------------------------------- report
def _interval_cell(stat: Mapping, signed: bool = True) -> str:
    if stat["value"] is None:
        return "undefined"
    form = "{:+.3f}" if signed else "{:.3f}"
    ci = f" [{form.format(stat['ci'][0])}, {form.format(stat['ci'][1])}]" if stat["ci"] else ""
    return form.format(stat["value"]) + ci


def _spread_cell(values: Sequence[float | None], signed: bool = True) -> str:
    """Mean ± std over seeds of a statistic, or "undefined in k of n seeds"."""
    defined = [v for v in values if v is not None]
    if len(defined) < len(values):
        return f"undefined in {len(values) - len(defined)} of {len(values)} seeds"
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(np.mean(defined))} ± {np.std(defined, ddof=1):.3f}"


def _mean_of(results: Sequence[Mapping], key: str) -> str:
    # significant digits: a real vocabulary's H/log V goes down to 1e-27, which decimals would print as 0
    values = [r["entropy_ratio"][key] for r in results if r["entropy_ratio"][key] is not None]
    return f"{np.mean(values):.4g}" if values else "–"


def figure1_table(rows: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown: per model (one result of entropy_hallucination_correlation per seed), the captions, H/log V and
    the three statistics (one seed: with the bootstrap interval; several: mean ± std over seeds, H/log V means
    averaged over seeds), then what each shows (`verdict`)."""
    lines = ["| model | captions | hallucinating | H/log V mean (min–max) | mean H/log V: hallucinating / clean "
             "| Spearman ρ | point-biserial r | AUC |", "|---|" + "---|" * 7]
    notes = []
    for name, results in rows.items():
        if len(results) == 1:
            stats = [_interval_cell(results[0][s], signed=(s != "auc")) for s in STATISTICS]
        else:
            stats = [_spread_cell([r[s]["value"] for r in results], signed=(s != "auc")) for s in STATISTICS]
        low = min(r["entropy_ratio"]["min"] for r in results)
        high = max(r["entropy_ratio"]["max"] for r in results)
        lines.append(f"| {name} | {results[0]['n_captions']} | {'/'.join(str(r['n_hallucinated']) for r in results)} "
                     f"| {_mean_of(results, 'mean')} ({low:.4g}–{high:.4g}) "
                     f"| {_mean_of(results, 'mean_hallucinated')} / {_mean_of(results, 'mean_clean')} | "
                     + " | ".join(stats) + " |")
        notes.append(f"- {name}: " + "; ".join(verdict(r) for r in results) + ".")
    return "\n".join(lines + [""] + notes) + "\n"


def overall_finding(results: Sequence[Mapping]) -> str:
    """What a set of measurements (models × worlds × seeds) shows, as a sentence made from their numbers."""
    lower = sum(1 for r in results if r["spearman"]["ci"] and r["spearman"]["value"] is not None
                and r["spearman"]["ci"][1] < 0)
    higher = sum(1 for r in results if r["spearman"]["ci"] and r["spearman"]["value"] is not None
                 and r["spearman"]["ci"][0] > 0)
    undefined = sum(1 for r in results if r["spearman"]["value"] is None)
    neither = len(results) - lower - higher - undefined
    low = min(r["entropy_ratio"]["min"] for r in results)
    high = max(r["entropy_ratio"]["max"] for r in results)
    text = (f"Of {len(results)} measurements (model × world × seed), {lower} show hallucinating captions with lower "
            f"H/log V (95 % interval of ρ below 0), {higher} with higher H/log V (interval above 0), "
            f"{neither} no interval that excludes 0" + (f", and {undefined} are undefined" if undefined else "")
            + f". H/log V lies within {low:.4g}–{high:.4g} over every image and model. ")
    if undefined > len(results) / 2:
        return (text + "Too few of these measurements have both hallucinating and clean captions to say anything "
                "about the paper's claim here.")
    if lower > len(results) / 2 and higher == 0:
        return (text + "On this testbed the smoothness of the similarity distribution does go with hallucination, "
                "and at the peaked end, where AdaVIB's α = −log(H/log V) puts the most weight.")
    if higher > len(results) / 2 and lower == 0:
        return (text + "On this testbed the smoothness of the similarity distribution does go with hallucination, "
                "but the smoother the more: AdaVIB's α = −log(H/log V) puts the most weight on the other, "
                "peaked end.")
    if neither + undefined > len(results) / 2:
        return (text + "On this testbed the paper's claim is not borne out: most measurements cannot tell the "
                "H/log V of hallucinating captions from that of clean ones.")
    return text + "On this testbed the measurements disagree: no consistent association either way."


def plot_hallucination_by_bin(panels: Mapping[str, Mapping[str, Sequence[Mapping]]], path, title: str) -> None:
    """A PNG: one panel per world, one line per model, hallucination rate against the mean H/log V of each bin
    (`hallucination_by_bin`). panels: {world: {model: bins}}."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    top = max([5.0] + [100 * b["rate"] for lines in panels.values() for bins in lines.values() for b in bins])
    for ax, (world, lines) in zip(axes[0], panels.items(), strict=True):
        for name, bins in lines.items():
            ax.plot([b["mean_entropy_ratio"] for b in bins], [100 * b["rate"] for b in bins], "o-", label=name)
        ax.set_ylim(0, 1.1 * top)  # rates from 0, every panel on one scale
        ax.set_title(world)
        ax.set_xlabel("H / log V of the pooled visual tokens (bin mean)")
        ax.set_ylabel("captions that hallucinate (%)")
        ax.ticklabel_format(axis="x", useOffset=False)  # values close together: print them, not an offset
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
