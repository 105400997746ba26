"""The demo's view of the AdaVIB similarity diagnostics (minigpt4/models/visual_diagnostics.py computes them):
H/log V, α and the nearest vocabulary words of an image, as a Markdown block."""
from __future__ import annotations

import html

from minigpt4.models.visual_diagnostics import ImageDiagnostics


def _cell(text: str) -> str:
    # Inside a Markdown table: spaces shown as "␣" (" dog" and "dog" are different entries), control
    # characters escaped, HTML inert, and no "|" or "`" that would break the table.
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text).replace(" ", "␣")
    return html.escape(shown).replace("|", "&#124;").replace("`", "&#96;")


def diagnostics_markdown(diag: ImageDiagnostics, title: str) -> str:
    """A short Markdown block: H/log V, α, ‖u‖ and the top-k vocabulary words with their probabilities. Four
    significant digits, not decimals: on a real vocabulary H/log V can be 1e-5, which 4 decimals show as 0."""
    rows = "\n".join(f"| {rank} | {_cell(word)} | {p:.4f} |" for rank, (word, p) in enumerate(diag.top_words, 1))
    return (
        f"**{title}**\n\n"
        f"H/log V = **{diag.entropy_ratio:.4g}** &nbsp; α = −log(H/log V) = **{diag.alpha:.4g}** "
        f"&nbsp; (V = {diag.vocab_size})\n\n"
        f"‖u‖ = {diag.pooled_norm:.4g} for the pooled visual tokens, against {diag.word_norm:.3g} for the mean word "
        "embedding: a u much longer than a word puts p on one entry whatever its direction\n\n"
        f"| # | nearest vocabulary entry | p |\n|---|---|---|\n{rows}\n"
    )
