"""Finite-value guards for a built model: its weights once loaded and cast, and its logits while generating.

A non-finite weight does not fail loudly: the logits become NaN, greedy decoding then picks token 0 on every
step, the decoded answer is an empty string, and POPE's rule scores an answer without a negation as "yes".
So a model whose weights are non-finite in the dtypes it will run in is refused before it answers anything
(`refuse_nonfinite_weights`, called by the builder), and generation stops on the first non-finite logits
(`NonFiniteLogitsGuard`), which finite weights can still produce when an activation overflows its dtype.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from transformers import LogitsProcessor

from minigpt4.models.checkpoints import FSDP_PREFIX, CheckpointError, key_listing


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no ±inf in `tensor`. torch.aminmax propagates NaN and keeps ±inf, in one pass without a
    temporary: `isfinite(t).all()` makes four passes and a bool copy per tensor (a third of a 7B build's time)."""
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def nonfinite_tensors(module: nn.Module) -> list[tuple[str, torch.dtype]]:
    """(name, dtype) of every floating-point parameter and buffer holding NaN or inf, in module order."""
    found = []
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and tensor.numel() and not all_finite(tensor):
            found.append((name.replace(FSDP_PREFIX, ""), tensor.dtype))
    return found


def _range_hint(dtypes: set[torch.dtype]) -> str:
    if torch.float16 in dtypes:
        return ("; float16 holds at most 65504: if the files are finite in their own dtype, use bf16 or fp32 "
                "(model.llm_dtype / model.encoder_dtype)")
    return ""


def refuse_nonfinite_weights(model: nn.Module, sources: Mapping[str, str]) -> None:
    """CheckpointError naming every non-finite weight of `model` (after loading and casting) and where its
    part was loaded from. `sources`: {top-level module name: "model.<key> = <path>"}."""
    bad = nonfinite_tensors(model)
    if not bad:
        return
    names = [f"{name} ({str(dtype).replace('torch.', '')})" for name, dtype in bad]
    origins = sorted({sources.get(name.split(".", 1)[0], "random initialisation") for name, _ in bad})
    raise CheckpointError(
        f"the model's weights are not finite after loading them in the dtypes it runs in: {len(bad)} tensor(s) "
        f"hold NaN or inf: {key_listing(names, limit=6)}; loaded from {'; '.join(origins)}"
        f"{_range_hint({dtype for _, dtype in bad})}. Refusing to run: NaN logits decode to empty answers"
    )


class NonFiniteLogitsError(FloatingPointError):
    """Generation met NaN or +inf logits (or a row with every token at -inf)."""


class NonFiniteLogitsGuard(LogitsProcessor):
    """Stop generation at the first step whose scores are not usable, instead of decoding token 0 silently.

    -inf entries alone are legitimate (other processors mask tokens with them); a row where every entry is
    -inf, or any NaN / +inf, is not.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            hint = _range_hint({self.dtype}) if self.dtype is not None else ""
            raise NonFiniteLogitsError(
                f"non-finite logits (NaN/inf) at generated token {input_ids.shape[-1] + 1} for batch row(s) "
                f"{rows[:8]}: the answers would decode to empty strings, so generation stops. The weights were "
                f"finite when loaded: an activation overflowed its dtype or the image features are not finite{hint}"
            )
        return scores
