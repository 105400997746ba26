"""The demo's picture of H/log V: a bar plot of the top-k similarity probabilities p = softmax(u·Eᵀ) of the pooled
visual tokens, one panel per projector, against the uniform 1/V that H/log V = 1 would mean. A peaked panel (one
tall bar) is what AdaVIB weighs most (large α); a flat one sits near the uniform line."""
from __future__ import annotations

from minigpt4.models.visual_diagnostics import ImageDiagnostics


def similarity_figure(panels: dict[str, ImageDiagnostics]):
    """A matplotlib Figure (Agg, no display needed) with one bar panel per {title: diagnostics}."""
    import matplotlib

    matplotlib.use("Agg")  # a server: never open a window
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(panels), 3.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    top = max((p for diag in panels.values() for _, p in diag.top_words), default=1.0)
    for ax, (title, diag) in zip(axes, panels.items()):
        probs = [p for _, p in diag.top_words]
        ax.bar(range(1, len(probs) + 1), probs, color="#4f7cac")
        ax.axhline(1.0 / diag.vocab_size, color="#b45309", linestyle="--", linewidth=1,
                   label=f"uniform 1/V (V = {diag.vocab_size})")
        ax.set_ylim(0, top * 1.1)
        ax.set_xticks(range(1, len(probs) + 1))
        ax.set_xlabel(f"rank among the top {len(probs)} vocabulary entries")
        ax.set_ylabel("p = softmax(u·Eᵀ)")
        ax.set_title(f"{title}: H/log V = {diag.entropy_ratio:.3g}, α = {diag.alpha:.3g}", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    figure.suptitle("Top-k similarity of the pooled visual tokens to the LLM vocabulary", fontsize=10)
    return figure
