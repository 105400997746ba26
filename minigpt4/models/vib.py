"""The whole AdaVIB method in one file: pooling, KL, similarity entropy, adaptive weight, and the projector.

Bai et al., "Mitigating Hallucinations in Large Vision-Language Models by Adaptively Constraining Information
Flow" (AAAI 2025). The equations are the paper's (VIB objective, Gaussian KL, similarity entropy, α); this
file follows them one to one. Everything here is model-agnostic: MiniGPT-4 feeds 32 Q-Former tokens of width 768,
LLaVA-1.5 576 CLIP patches of width 1024; the projector only needs `in_dim`, `out_dim`, its settings and
(optionally) custom heads. The settings are `model.vib` of the YAML as a `VIBConfig`, held by the projector alone:
YAML -> VIBConfig -> VIBProjector, whose `kl_term` the model adds to its cross-entropy.

Shapes: q is B×N×D (visual features), tokens are (S·B)×N×d, flattened *sample-major* (row s·B + b) so the
caller can repeat its text batch S times with `tensor.repeat(S, 1)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt4.common.config import VIBConfig

STD_FLOOR = 1e-8  # logs of σ are taken of max(σ, 1e-8), as in the reference
ENTROPY_EPS = 1e-8  # H = -Σ p log(p + 1e-8), as in the reference
RATIO_FLOOR = 1e-6  # H/log V is clamped into [1e-6, 1] so α <= -log(1e-6) ≈ 13.8 and never inf


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the VIB math runs in: at least fp32 (fp16/bf16 lose too much in squares, logs and sums of N
    tokens), and never lower than what the caller gave (fp64 in, fp64 math)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def pool_tokens(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i h_i / √(Σ_i m_i) over the token axis (-2): "sum divided by the square root of the length".

    h: (..., N, d); mask: (..., N) of 0/1 (all ones when None). Returns (..., d) in at least fp32 (`math_dtype`):
    the pooled vectors only feed the KL and entropy, and under fp16 the sum of N tokens overflows to inf (then α
    silently becomes 0) long before the pooled value itself is out of range.
    """
    h = h.to(math_dtype(h))
    if mask is None:
        return h.sum(dim=-2) / math.sqrt(h.shape[-2])
    m = mask.to(h.dtype).unsqueeze(-1)
    count = m.sum(dim=-2).clamp_min(1.0)
    return (h * m).sum(dim=-2) / count.sqrt()


def gaussian_kl(mu_q: torch.Tensor, std_q: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, std_q²) || N(mu_p, std_p²)) for diagonal Gaussians, summed over the last axis.

    Computed in at least fp32 (`math_dtype`: under bf16 the squares and logs lose too much; fp64 stays fp64).
    Standard deviations are floored at 1e-8 inside the logs *and* the ratios, so a collapsed σ gives a large
    finite KL instead of inf/NaN.
    """
    dtype = math_dtype(mu_q, std_q, mu_p, std_p)
    mu_q, std_q, mu_p, std_p = (t.to(dtype) for t in (mu_q, std_q, mu_p, std_p))
    var_q = std_q.clamp_min(STD_FLOOR).square()
    var_p = std_p.clamp_min(STD_FLOOR).square()
    kl = 0.5 * (var_q / var_p + (mu_p - mu_q).square() / var_p - 1.0 + var_p.log() - var_q.log())
    return kl.sum(dim=-1)


@torch.no_grad()
def similarity_entropy(u: torch.Tensor, embed_weight: torch.Tensor, chunk_size: int = 64,
                       vocab_chunk: int = 4096) -> torch.Tensor:
    """Entropy of softmax(u · Eᵀ) over the vocabulary, in at least fp32 (`math_dtype`) and without gradient.

    u: (..., d) pooled visual tokens; embed_weight: (V, d) the LLM's input embeddings. Returns (...) in
    [0, log V]. The reference uses -Σ p log(p + 1e-8) (not the exact -Σ p log p); we keep that. Rows are
    processed in chunks so a large batch never materialises more than chunk_size × V logits at once, and the
    table is cast vocab_chunk rows at a time: a bf16 32,000 × 4096 table is never copied whole to fp32 (524 MB).
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        lead = u.shape[:-1]
        dtype = math_dtype(u, embed_weight)
        flat = u.reshape(-1, u.shape[-1]).to(dtype)
        out = []
        for rows in flat.split(chunk_size):
            logits = torch.cat([rows @ part.to(dtype).T for part in embed_weight.split(vocab_chunk)], dim=-1)
            p = torch.softmax(logits, dim=-1)
            out.append(-(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1))
        return torch.cat(out).reshape(lead)


def mean_word_length(embed_weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mean ‖E_v‖ of the LLM's input embeddings, computed in `dtype` (default: at least fp32): the scale the
    pooled token u is compared with, by the length-free entropy, the demo's diagnostics and
    scripts/real_small_entropy.py."""
    with torch.no_grad(), torch.autocast(device_type=embed_weight.device.type, enabled=False):
        return torch.linalg.vector_norm(embed_weight.to(dtype or math_dtype(embed_weight)), dim=-1).mean()


def rescaled_to_word_length(u: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
    """u with its length set to the mean length of the LLM's word embeddings, its direction kept (in at least fp32).

    `model.vib.entropy_of: length_free`, an ablation that is NOT the paper's formula. softmax(u·Eᵀ) is sharper the
    longer u is; with a real LLM the pooled token is far longer than any word embedding (SmolLM2-135M: a word
    embedding is about 3 long, u tens to hundreds), so the paper's H/log V mostly measures ‖u‖. At a word's length
    the entropy says how close u's direction is to some words', which is what α is meant to read.
    """
    with torch.no_grad(), torch.autocast(device_type=u.device.type, enabled=False):
        dtype = math_dtype(u, embed_weight)
        word_length = mean_word_length(embed_weight, dtype)
        u = u.to(dtype)
        return u * (word_length / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(STD_FLOOR))


def entropy_input(u: torch.Tensor, embed_weight: torch.Tensor, entropy_of: str = "pooled") -> torch.Tensor:
    """What the similarity entropy is taken of under `model.vib.entropy_of`: the pooled u itself (the paper), or u
    rescaled to a word's length (`length_free`, the ablation)."""
    if entropy_of == "pooled":
        return u
    if entropy_of == "length_free":
        return rescaled_to_word_length(u, embed_weight)
    raise ValueError(f"model.vib.entropy_of must be 'pooled' or 'length_free', got {entropy_of!r}")


def adaptive_weight(entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """α = -log(H / log V): 0 for a uniform similarity distribution, large for a peaked (over-confident) one.

    Finite for every input: H/log V is clamped into [1e-6, 1]; NaN or +inf entropies (a broken forward) map
    to α = 0 (no extra pull) rather than poisoning the loss, -inf to the largest α.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 for a normalised entropy, got {vocab_size}")
    ratio = entropy.to(math_dtype(entropy)) / math.log(vocab_size)
    ratio = torch.nan_to_num(ratio, nan=1.0, posinf=1.0, neginf=RATIO_FLOOR).clamp(RATIO_FLOOR, 1.0)
    return -torch.log(ratio)


class VIBProjector(nn.Module):
    """Stochastic projector q -> z ~ N(μ(q), σ(q)²) with a learned Gaussian prior, as in the AdaVIB paper.

    `config` is `model.vib` from the YAML, and this module is its one owner: S and `reparameterize` decide the
    sampling, `kl_on` the KL, β and `adaptive` the weighted KL term it returns for the loss (defaults: the
    reference recipe). The mean head is the original projector and keeps its name, `llama_proj`, so released
    MiniGPT-4 projector checkpoints (and LLaVA's `mm_projector`, via `mean_head`) load into it unchanged. The
    std head `llama_proj_std` is new; by default it has the same form as the mean head.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        config: VIBConfig | None = None,
        *,
        mean_head: nn.Module | None = None,
        std_head: nn.Module | None = None,
    ):
        super().__init__()
        self.config = VIBConfig() if config is None else config
        self.config.validate()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.llama_proj = mean_head if mean_head is not None else nn.Linear(in_dim, out_dim)
        self.llama_proj_std = std_head if std_head is not None else nn.Linear(in_dim, out_dim)
        # Reference init of the prior: standard normal for both the mean and the pre-softplus scale.
        self.mu_p = nn.Parameter(torch.randn(out_dim))
        self.std_p = nn.Parameter(torch.randn(out_dim))

    def prior_std(self) -> torch.Tensor:
        return F.softplus(self.std_p)

    def forward(
        self,
        q: torch.Tensor,
        *,
        embed_weight: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (tokens, info).

        Training (self.training and config.reparameterize): tokens = μ + σ ⊙ ε for S samples, (S·B)×N×d
        sample-major; S is config.num_samples unless `num_samples` asks for another count in this call.
        Otherwise tokens = μ (B×N×d): inference costs exactly what the linear projector costs.
        info: `kl` (B,), `alpha` (B,), `entropy_ratio` (B,) — H/log V averaged over samples, `sigma` (scalar
        mean σ), `kl_term` (scalar, β·mean(α·KL), or β·mean(KL) when not config.adaptive). Entropy/α need
        `embed_weight`; without it α is 1 and adaptive weighting is off.
        """
        cfg = self.config
        mu = self.llama_proj(q)
        std = F.softplus(self.llama_proj_std(q))
        batch = q.shape[0]
        sampling = self.training and cfg.reparameterize
        samples = (cfg.num_samples if num_samples is None else num_samples) if sampling else 1
        if sampling:
            # ε in z's own dtype: under fp16 autocast σ comes out of softplus in fp32, so ε is fp32 as AdaVIB's
            # torch.randn (minigpt4/models/mini_gpt4.py `reparameterize`), not fp16-rounded noise.
            eps = torch.randn((samples, *mu.shape), dtype=torch.promote_types(mu.dtype, std.dtype), device=mu.device)
            z = (mu.unsqueeze(0) + std.unsqueeze(0) * eps).reshape(samples * batch, *mu.shape[1:])
        else:
            z = mu

        prior_mu, prior_std = self.mu_p, self.prior_std()
        if cfg.kl_on == "pooled":
            # The reference pools μ and σ separately and linearly (σ̄ is not the std of pool(z)).
            kl = gaussian_kl(pool_tokens(mu, token_mask), pool_tokens(std, token_mask), prior_mu, prior_std)
        else:
            # Per-token KL of the N independent token posteriors, summed over tokens (the exact KL of the
            # joint); masked tokens contribute nothing.
            per_token = gaussian_kl(mu, std, prior_mu, prior_std)
            kl = (per_token * token_mask.to(per_token.dtype)).sum(-1) if token_mask is not None else per_token.sum(-1)

        if embed_weight is not None:
            mask = None if token_mask is None else token_mask.repeat(samples, 1)
            pooled = entropy_input(pool_tokens(z.detach(), mask), embed_weight, cfg.entropy_of)
            entropy = similarity_entropy(pooled, embed_weight)  # (S·B,)
            vocab = embed_weight.shape[0]
            alpha = adaptive_weight(entropy, vocab).reshape(samples, batch).mean(0)
            ratio = (entropy / math.log(vocab)).reshape(samples, batch).mean(0)
        else:
            alpha = torch.ones(batch, device=q.device)
            ratio = torch.full((batch,), float("nan"), device=q.device)

        weighted = alpha * kl if cfg.adaptive and embed_weight is not None else kl
        info = {
            "kl": kl,
            "alpha": alpha,
            "entropy_ratio": ratio,
            "sigma": std.detach().to(math_dtype(std)).mean(),
            "kl_term": cfg.beta * weighted.mean(),
        }
        return z, info


class LinearProjector(nn.Module):
    """The original MiniGPT-4 projector (`llama_proj`), with the VIB projector's call signature."""

    def __init__(self, in_dim: int, out_dim: int, *, mean_head: nn.Module | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.llama_proj = mean_head if mean_head is not None else nn.Linear(in_dim, out_dim)

    def forward(self, q: torch.Tensor, *, embed_weight: torch.Tensor | None = None, **_: object):
        z = self.llama_proj(q)
        info: dict[str, torch.Tensor] = {}
        if embed_weight is not None:  # diagnostics only (demo, analysis); no effect on the loss
            with torch.no_grad():
                entropy = similarity_entropy(pool_tokens(z), embed_weight)
                info["entropy_ratio"] = entropy / math.log(embed_weight.shape[0])
                info["alpha"] = adaptive_weight(entropy, embed_weight.shape[0])
        return z, info


def build_projector(kind: str, in_dim: int, out_dim: int, vib: VIBConfig | None = None, *,
                    mean_head: nn.Module | None = None, std_head: nn.Module | None = None) -> nn.Module:
    """`model.mm_projector_type` and `model.vib` from YAML -> projector module (the linear one has no VIB settings)."""
    if kind == "linear":
        return LinearProjector(in_dim, out_dim, mean_head=mean_head)
    if kind == "vib":
        return VIBProjector(in_dim, out_dim, vib, mean_head=mean_head, std_head=std_head)
    raise ValueError(f"model.mm_projector_type must be one of 'linear', 'vib'; got {kind!r}")
