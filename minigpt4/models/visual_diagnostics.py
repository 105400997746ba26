"""How over-confident are an image's visual tokens? The AdaVIB similarity diagnostics for one projector.

They live beside vib.py, whose functions they apply to a built model: the demo shows them, and
scripts/analyze_similarity.py, scripts/visual_entropy.py and the experiments measure with them.

For an image, the projector's mean output μ (what the LLM sees at inference; no noise) is pooled over the
visual tokens, u = Σ_i μ_i / √N, and compared with every row of the LLM's input-embedding matrix E:
p = softmax(u · Eᵀ). Its entropy H, normalised by log V, is 1 for a uniform p and near 0 when u sits on one
vocabulary word; α = -log(H / log V) is the weight AdaVIB puts on that image's KL term (vib.py:
similarity_entropy, adaptive_weight).
The top entries of p are the vocabulary words the pooled visual tokens are closest to.
The numbers come from the same functions training uses (`minigpt4.models.vib`), so the demo, the analysis
scripts and the logged training statistics agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minigpt4.models.vib import adaptive_weight, mean_word_length, pool_tokens, similarity_entropy


@dataclass(frozen=True)
class ImageDiagnostics:
    entropy_ratio: float  # H / log V in [0, 1]
    alpha: float  # -log(H / log V), clamped as in training
    top_words: list[tuple[str, float]]  # (vocabulary entry as text, probability), most similar first
    vocab_size: int
    pooled_norm: float  # ‖u‖: with a real vocabulary H/log V follows it more than u's direction
    word_norm: float  # the mean ‖E_v‖ of the vocabulary's input embeddings, the scale u is compared with


@torch.no_grad()
def pooled_visual_tokens(model, features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) Q-Former features -> (B, d) pooled projector means, fp32. `model` is a MiniGPT4 (or a
    compare-mode view of one); its projector runs in eval mode so a VIB projector returns μ, not a sample."""
    was_training = model.projector.training
    model.projector.eval()
    try:
        tokens, _ = model.project(features, num_samples=1)
    finally:
        model.projector.train(was_training)
    return pool_tokens(tokens.float())


@torch.no_grad()
def similarity_probs(pooled: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
    """softmax(u · Eᵀ) in fp32: (B, d), (V, d) -> (B, V)."""
    logits = pooled.float() @ embed_weight.to(device=pooled.device, dtype=torch.float32).T
    return torch.softmax(logits, dim=-1)


def token_text(tokenizer, token_id: int) -> str:
    """A vocabulary entry as a person reads it: the decoded text (" dog"), or the raw token when decoding
    gives nothing readable (a blank, or a byte-level piece of a multi-byte character)."""
    text = tokenizer.decode([token_id])
    if text.strip() and "\ufffd" not in text:
        return text
    raw = tokenizer.convert_ids_to_tokens(token_id)
    return raw if raw else f"<id {token_id}>"


def entropy_stats(pooled: torch.Tensor, embed_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H/log V, α) per row of `pooled`, with the exact functions training logs with."""
    vocab = embed_weight.shape[0]
    entropy = similarity_entropy(pooled, embed_weight)
    return entropy / math.log(vocab), adaptive_weight(entropy, vocab)


@torch.no_grad()
def diagnose_features(model, features: torch.Tensor, top_k: int = 10) -> list[ImageDiagnostics]:
    """Diagnostics for each image of a (B, N, D) feature batch, for `model`'s projector."""
    embed = model.embed_weight
    vocab = embed.shape[0]
    pooled = pooled_visual_tokens(model, features)
    ratio, alpha = (t.tolist() for t in entropy_stats(pooled, embed))
    probs = similarity_probs(pooled, embed)
    top_p, top_ids = probs.topk(min(top_k, vocab), dim=-1)
    norms = pooled.norm(dim=-1).tolist()
    word_norm = float(mean_word_length(embed))
    results = []
    for b in range(features.shape[0]):
        words = [(token_text(model.tokenizer, int(i)), float(p)) for p, i in zip(top_p[b], top_ids[b], strict=True)]
        results.append(ImageDiagnostics(float(ratio[b]), float(alpha[b]), words, vocab, float(norms[b]), word_norm))
    return results


@torch.no_grad()
def sorted_similarity(model, features: torch.Tensor) -> torch.Tensor:
    """(B, V) similarity distributions sorted in decreasing order (the paper's motivating figure)."""
    probs = similarity_probs(pooled_visual_tokens(model, features), model.embed_weight)
    return probs.sort(dim=-1, descending=True).values
