"""Visual Contrastive Decoding (VCD; Leng et al., CVPR 2024) for MiniGPT-4 and LLaVA-1.5, any projector.

Each answer is decoded from two streams of the same prompt: the image v and a distorted copy v′. At every step

    p_vcd = softmax[(1 + α)·logit(y | v, x) − α·logit(y | v′, x)]      over the tokens with p(y | v, x) ≥ β·max p

(the adaptive plausibility cut-off, taken over the ORIGINAL stream's distribution; every other token gets −inf),
then the usual processors (min_new_tokens), the sampling warpers and a draw, or an argmax when not sampling.
v′ is the diffusion forward process q(x_t | x_0) at step t of a 1000-step schedule, applied to the preprocessed
(normalised) image tensor, as the source applies it to the processor's output.

Follows DAMO-NLP-SG/VCD: vcd_utils/vcd_sample.py (the contrastive logits and the cut-off in its "version 2" form,
logit(y) < log β + max logit -> −inf, which is p(y) < β·max p; processors and warpers after the cut-off) and
vcd_utils/vcd_add_noise.py (the schedule and q(x_t | x_0)). As the source's later vcd_sample.py, each stream keeps
its own KV cache (an earlier version copied the clean stream's cache into the distorted one at every step).

Here both streams run as one 2B-row batch with one KV cache (rows 0..B-1 clean, B..2B-1 distorted), left-padded
with attention masks and position ids as transformers' generate() makes them; each row stops on its own at the
end string or EOS (later tokens are the pad id), and rows draw from their own seeded generators, so a batched
answer equals the batch-1 answer and a rerun draws the same tokens.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minigpt4.models.numerics import NonFiniteLogitsGuard

# DAMO-NLP-SG/VCD:vcd_utils/vcd_add_noise.py: 1000 steps, β_t = sigmoid(linspace(−6, 6)) · (5e-3 − 1e-5) + 1e-5
NOISE_STEPS = 1000
NOISE_BETA_LOW, NOISE_BETA_HIGH = 1e-5, 0.5e-2


@dataclass(frozen=True)
class ContrastiveDecoding:
    """The parameters of one VCD run (DAMO-NLP-SG/VCD names: cd_alpha, cd_beta, noise_step; do_sample, temperature,
    top_p, top_k as passed to its generate)."""

    alpha: float
    beta: float
    noise_step: int
    sample: bool = True  # the source samples (do_sample=True); False: argmax of the VCD scores
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k (the source passes top_k=None)
    seed: int = 0  # of the distortion noise and of each row's sampling generator


# ------------------------------------------------------------------------------------------------ the distortion
@functools.lru_cache(maxsize=1)
def cumulative_alphas() -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) of the source's schedule, t = 0..999 (float32, as the source computes it)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS)) * (NOISE_BETA_HIGH - NOISE_BETA_LOW) + NOISE_BETA_LOW
    return torch.cumprod(1 - betas, dim=0)


def diffuse(image: torch.Tensor, noise_step: int, noise: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) with the given Gaussian `noise`: sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε. A new tensor; `image` is kept."""
    if not 0 <= noise_step < NOISE_STEPS:
        raise ValueError(f"noise_step = {noise_step}; the schedule has steps 0..{NOISE_STEPS - 1}")
    alpha_bar = cumulative_alphas()[noise_step]
    return alpha_bar.sqrt() * image + (1 - alpha_bar).sqrt() * noise.to(image.dtype)


def distort_image(image: torch.Tensor, noise_step: int, seed: int) -> torch.Tensor:
    """The distorted image v′ of a preprocessed (3, H, W) tensor: `diffuse` with noise drawn from `seed` (on the
    CPU, so the draw is the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float32)
    return diffuse(image, noise_step, noise.to(image.device))


# ---------------------------------------------------------------------------------------------- one decoding step
def contrastive_logits(logits: torch.Tensor, distorted_logits: torch.Tensor, alpha: float,
                       beta: float) -> torch.Tensor:
    """(1 + α)·logits − α·distorted_logits where logit ≥ log β + max logit (p ≥ β·max p), −inf elsewhere."""
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    scores = (1 + alpha) * logits - alpha * distorted_logits
    return scores.masked_fill(logits < cutoff, -float("inf"))


def warpers(decoding: ContrastiveDecoding) -> LogitsProcessorList:
    """The sampling warpers the source's generate applies after the cut-off, in transformers' order."""
    found = LogitsProcessorList()
    if decoding.temperature != 1.0:
        found.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k > 0:
        found.append(TopKLogitsWarper(decoding.top_k))
    if decoding.top_p < 1.0:
        found.append(TopPLogitsWarper(decoding.top_p))
    return found


def choose_tokens(scores: torch.Tensor, decoding: ContrastiveDecoding, generators: list[torch.Generator],
                  active: torch.Tensor) -> torch.Tensor:
    """Next token per row: an argmax, or one draw from the row's own generator (only for the rows still active,
    so a row's draws do not depend on the other rows of its batch)."""
    if not decoding.sample:
        return scores.argmax(dim=-1)
    chosen = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    probs = torch.softmax(warpers(decoding)(None, scores.float()), dim=-1)
    for row in active.nonzero().flatten().tolist():
        chosen[row] = torch.multinomial(probs[row], 1, generator=generators[row]).item()
    return chosen


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


# --------------------------------------------------------------------------------------------- the decoding loop
def cache_keyword(llm) -> str:
    """The KV-cache keyword of the LLM's forward: `cache` in newer transformers 5 releases, else past_key_values."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


@torch.no_grad()
def contrastive_token_ids(model, prompts: list[str], features: torch.Tensor, distorted_features: torch.Tensor,
                          decoding: ContrastiveDecoding, *, row_seeds: list[int], max_new_tokens: int,
                          min_new_tokens: int = 0, stop_strings: list[str] | None = None) -> torch.Tensor:
    """New token ids (B, T) of VCD for `prompts` with encoder outputs of the images and of their distorted copies;
    a row that stopped is filled with the pad id. `stop_strings` None: the model's end string; []: EOS only."""
    if len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    rows, tokenizer = len(prompts), model.tokenizer
    with model.autocast():
        tokens = model.generation_visual_tokens(torch.cat([features, distorted_features]))
        text = model.build_generation_text(prompts).to(model.device)
        both = text.repeat(2)  # the same prompt for both streams
        embeds = model.embed(both, tokens)  # rows 0..B-1: v, rows B..2B-1: v′
        mask = both.attention_mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = {cache_keyword(model.llm): DynamicCache(config=model.llm.config)}
        out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **cache)
        stops = [model.end_sym] if stop_strings is None else list(stop_strings)
        stop_at = StopStringCriteria(tokenizer, stops) if stops else None
        ban_eos = MinNewTokensLengthLogitsProcessor(0, min_new_tokens, tokenizer.eos_token_id, device=model.device)
        guard = NonFiniteLogitsGuard(embeds.dtype)
        generators = row_generators(row_seeds, model.device)
        generated = torch.zeros((rows, 0), dtype=torch.long, device=model.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=model.device)
        for _ in range(max_new_tokens):
            logits = guard(generated.repeat(2, 1), out.logits[:, -1].float())
            scores = ban_eos(generated, contrastive_logits(logits[:rows], logits[rows:], decoding.alpha, decoding.beta))
            guard(generated[~finished], scores[~finished])  # every plausible token banned: refuse, as the source fails
            chosen = choose_tokens(scores, decoding, generators, ~finished)
            chosen = chosen.masked_fill(finished, tokenizer.pad_token_id)
            generated = torch.cat([generated, chosen[:, None]], dim=-1)
            finished |= chosen == tokenizer.eos_token_id
            if stop_at is not None:
                finished |= stop_at(generated, None).to(finished.device)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones((2 * rows, 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = model.llm(input_ids=chosen.repeat(2)[:, None], attention_mask=mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **cache)
    return generated


def generate_contrastive(model, prompts: list[str], features: torch.Tensor, distorted_features: torch.Tensor,
                         decoding: ContrastiveDecoding, *, row_seeds: list[int], max_new_tokens: int,
                         min_new_tokens: int = 0, stop_strings: list[str] | None = None) -> list[str]:
    """VCD answers, decoded and cut at the end string as MiniGPT4.generate returns its answers."""
    ids = contrastive_token_ids(model, prompts, features, distorted_features, decoding, row_seeds=row_seeds,
                                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                stop_strings=stop_strings)
    return [model.clean_answer(t) for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
