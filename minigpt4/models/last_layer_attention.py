"""The attention probabilities of an LLM's last decoder layer, without switching the model to eager attention.

OPERA (minigpt4/models/opera.py) scores candidate tokens by the self-attention of the LLM's LAST layer.
shikiw/OPERA gets it by running the whole model with `output_attentions=True`, i.e. every layer in eager
attention with its attention matrix materialised. Here only the last decoder layer's attention module is pointed
at one more attention function, registered with transformers' AttentionInterface: it returns the output of the
model's own kernel (sdpa, flash or eager, whatever `attn_implementation` says) unchanged and, while a recording is
on, also computes that layer's probabilities from the same query and key states:

    p = softmax(q·kᵀ · scaling, masked where the caller's 2-D attention mask is 0)   (softmax in float32, then
                                                                                     the query's dtype)

as transformers' eager_attention_forward (and the source's LlamaAttention of 4.29.2) computes them, keeping only
the maximum over heads, all that OPERA uses. Nothing else changes: the other layers keep their kernel and the
model's config is untouched; the layer gets a shallow copy of the config differing only in the implementation
name, and its own config back when the context exits. Recording is for one-token steps (decoding), where the
caller's mask is the whole story (no causal part).
"""
from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "minigpt4_last_layer_probabilities"


def _output_and_probabilities(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the model's own kernel, plus the recording (module docstring)."""
    probe: LastLayerAttention = module.config.last_layer_probe
    output = probe.model_kernel(module)(module, query, key, value, attention_mask, **kwargs)
    if probe.mask is not None:
        probe.record(module, query, key)
    return output


AttentionInterface.register(ATTENTION_NAME, _output_and_probabilities)


def last_attention_module(llm) -> torch.nn.Module:
    """The self-attention of the last decoder layer of a causal LM (LlamaForCausalLM and its kin)."""
    return llm.get_decoder().layers[-1].self_attn


class LastLayerAttention:
    """Context manager over an LLM: inside it, `with probe.recording(mask): llm(...)` leaves the last layer's
    attention probabilities of a one-token step, maximum over heads, in `probe.probabilities` (rows, keys)."""

    def __init__(self, llm):
        self.attention = last_attention_module(llm)
        self.implementation = llm.config._attn_implementation
        self.mask: Optional[torch.Tensor] = None
        self.probabilities: Optional[torch.Tensor] = None
        self._own_config = None

    def __enter__(self) -> "LastLayerAttention":
        self._own_config = self.attention.config
        patched = copy.copy(self._own_config)
        patched._attn_implementation_internal = ATTENTION_NAME  # this config only (no sub-configs to follow)
        patched.last_layer_probe = self
        self.attention.config = patched
        return self

    def __exit__(self, *exc) -> None:
        self.attention.config = self._own_config

    def model_kernel(self, module):
        """The attention function the model was built with; eager is the modeling file's own function."""
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.implementation, eager)

    @contextmanager
    def recording(self, mask: torch.Tensor) -> Iterator[None]:
        """Record during the forward passes inside; `mask` (rows, keys) is the step's 2-D attention mask, the new
        token included (1 = attend)."""
        self.mask, self.probabilities = mask.bool(), None
        try:
            yield
        finally:
            self.mask = None

    def record(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        if query.shape[2] != 1:
            raise ValueError(f"the last-layer attention is recorded for one-token steps, got {query.shape[2]} "
                             "query positions")
        groups = getattr(module, "num_key_value_groups", 1)
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # transformers' repeat_kv
        scores = torch.matmul(query, key.transpose(2, 3)) * module.scaling  # (rows, heads, 1, keys)
        scores = scores.masked_fill(~self.mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        self.probabilities = probabilities[:, :, 0].amax(dim=1)  # the maximum over heads
