"""What the full-size check's phases should cost, from the model's shapes alone (a meta-device model will do):
model FLOPs, bytes a decode step reads, and the memory model (weights + activations + optimizer + runtime).

FLOPs count the matrix products only (nn.Linear, the patch Conv2d, the entropy's u·Eᵀ), 2 per multiply-add:
* frozen LLM in training: 4·N per token: forward 2·N, backward 2·N for the activation gradients only (no weight
  gradient: its weights are frozen). N = the decoder's Linear weights at every position, + the LM head at the
  positions that predict an answer token only (MiniGPT4.answer_cross_entropy); the input embedding is a lookup,
  the norms are not matmuls.
* LLM prefill: 2·N_decoder per prompt token + 2·N_head per sequence (transformers computes the logits of the
  last position only when generating). Decode: the same for one token per sequence.
* encoder (frozen, forward only, once per image): 2·P per token it is applied to: every ViT Linear on
  1 + patches tokens, the patch Conv2d on the patches; the Q-Former's Linears on its queries, except the
  cross-attention key/value projections, which read the image tokens.
* projector (trained): forward 2·P, weight gradient 2·P, and 2·P more for the input gradient of every Linear
  after a head's first (the features entering it carry no gradient); plus the similarity entropy, 2·V·d per
  pooled row (fp32, no gradient).
Attention scores (QKᵀ, softmax·V) are left out: at these lengths they are under 1 % of the LLM's FLOPs.
tests/test_fullsize_check.py checks these counts against torch.utils.flop_counter on the tiny model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minigpt4.models.vib import similarity_entropy

FORMULAS = {
    "train": "4·N_decoder per LLM token + 4·N_head per answer token (forward 2·N + activation-gradient backward "
             "2·N; frozen weights, no weight gradient) + encoder forward + projector (forward, weight and input "
             "gradients) + entropy 2·V·d per row",
    "prefill": "2·N_decoder per non-padding prompt token + 2·N_head per sequence (logits of the last position only)",
    "encoder": "forward only, once per image: 2·P per token for every Linear (ViT: 1 + patches tokens; Q-Former: "
               "its queries, cross-attention K/V: the image tokens) and the patch Conv2d on the patches",
    "decode_bytes": "per step: every LLM matmul weight and norm + one embedding row per sequence + the K/V cache "
                    "of the mean context; compared with copy bandwidth = (read + written bytes) / s of a large copy",
    "N": "N_llm = Linear weights of the decoder layers + the LM head; input embedding and norms excluded",
    "not_counted": "attention scores (QKᵀ, softmax·V): < 1 % of the LLM FLOPs at these lengths",
}

# Bytes per element of the fp32 tensors the LLM keeps whatever its dtype: transformers' LlamaRMSNorm upcasts its
# input to fp32 and autograd saves that copy; sdpa saves its logsumexp in fp32; the loss upcasts the logits.
FP32 = 4
# Rows of the embedding table vib.similarity_entropy casts to fp32 at a time (its default).
ENTROPY_VOCAB_CHUNK = inspect.signature(similarity_entropy).parameters["vocab_chunk"].default


@dataclass(frozen=True)
class Shapes:
    """Everything the cost formulas need, read off a built (or meta) model."""

    weight_bytes: dict[str, int]  # encoder / projector / llm / other: parameters + buffers, in their dtypes
    trainable_params: int
    trainable_bytes: int
    llm_decoder_params: int  # Linear weights of the decoder layers
    llm_head_params: int
    llm_other_weight_bytes: int  # norms: read every decode step too
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    entropy_vocab: int
    compute_bytes: int  # element size of the LLM's weights and activations
    image_tokens: int  # tokens the vision tower runs on (CLS + patches)
    visual_tokens: int  # image slots in the prompt (N)
    visual_width: int  # projector input width
    encoder_flops_per_image: int
    projector_train_flops_per_image: int
    projector_eval_flops_per_image: int

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def llm_params(self) -> int:
        return self.llm_decoder_params + self.llm_head_params


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _vision_geometry(encoder: nn.Module) -> tuple[int, int]:
    """(image tokens incl. CLS, patches) of the vision tower: EVA ViT-g (MiniGPT-4) or CLIP (LLaVA)."""
    cfg = encoder.vision_config if hasattr(encoder, "vision_config") else encoder.config
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return patches + 1, patches


def encoder_flops(encoder: nn.Module) -> int:
    """Forward matmul FLOPs of one image through the frozen encoder (see the module docstring)."""
    image_tokens, patches = _vision_geometry(encoder)
    queries = encoder.num_query_tokens
    flops = 0
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels / groups × kh × kw
            flops += 2 * k * module.out_channels * patches
        elif isinstance(module, nn.Linear):
            reads_image = not name.startswith("qformer.") or (
                ".crossattention.attention." in name and name.rsplit(".", 1)[-1] in ("key", "value"))
            tokens = image_tokens if reads_image else queries
            flops += 2 * module.weight.numel() * tokens
    return flops


def projector_flops(projector: nn.Module, tokens: int, *, training: bool) -> int:
    """Matmul FLOPs of the projector heads (μ and, for the VIB, σ) on `tokens` visual tokens of one image."""
    flops = 0
    for head in (getattr(projector, "llama_proj", None), getattr(projector, "llama_proj_std", None)):
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            per_token = (6 if i else 4) if training else 2
            flops += per_token * linear.weight.numel() * tokens
    return flops


def read_shapes(model) -> Shapes:
    llm, cfg = model.llm, model.llm.config
    head = llm.get_output_embeddings().weight
    decoder = llm.model.layers
    parts = {"encoder": model.encoder, "projector": model.projector, "llm": llm}
    weight_bytes = {k: _bytes(list(m.parameters()) + list(m.buffers())) for k, m in parts.items()}
    listed = {id(t) for m in parts.values() for t in list(m.parameters()) + list(m.buffers())}
    weight_bytes["other"] = _bytes(t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in listed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    norms = [p for n, p in llm.named_parameters() if "norm" in n]
    heads = cfg.num_attention_heads
    image_tokens, _ = _vision_geometry(model.encoder)
    tokens = model.encoder.num_query_tokens
    entropy_rows = model.embed_weight.shape[0]
    return Shapes(
        weight_bytes=weight_bytes, trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=_bytes(trainable), llm_decoder_params=_linear_params(decoder),
        llm_head_params=head.numel(), llm_other_weight_bytes=_bytes(norms), layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, ffn=cfg.intermediate_size, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=head.shape[0],
        entropy_vocab=entropy_rows, compute_bytes=head.element_size(), image_tokens=image_tokens,
        visual_tokens=tokens, visual_width=model.encoder.out_dim,
        encoder_flops_per_image=encoder_flops(model.encoder),
        projector_train_flops_per_image=projector_flops(model.projector, tokens, training=True),
        projector_eval_flops_per_image=projector_flops(model.projector, tokens, training=False),
    )


# ------------------------------------------------------------------------------------------------------- FLOPs
def entropy_flops(s: Shapes, rows: int) -> int:
    return 2 * s.entropy_vocab * s.hidden * rows


def train_flops(s: Shapes, *, images: int, sequences: int, llm_tokens: int, answer_tokens: int) -> dict[str, int]:
    """One training micro-step: `images` images, `sequences` = S·B, `llm_tokens` = S·B·L tokens through the LLM's
    decoder, `answer_tokens` of them predicting a label, the only ones through the LM head
    (MiniGPT4.answer_cross_entropy). Frozen weights: forward 2·N and input gradient 2·N per token."""
    llm = 4 * s.llm_decoder_params * llm_tokens + 4 * s.llm_head_params * answer_tokens
    encoder = s.encoder_flops_per_image * images
    projector = s.projector_train_flops_per_image * images + entropy_flops(s, sequences)
    return {"llm": llm, "encoder": encoder, "projector": projector, "total": llm + encoder + projector}


def generation_flops(s: Shapes, *, images: int, prompt_tokens: int, new_tokens: int) -> dict[str, int]:
    """One generation batch of `images` sequences: encoder + projector (μ and σ heads, entropy of the pooled μ),
    the prefill of `prompt_tokens` (non-padding) and `new_tokens` - 1 decode steps per sequence."""
    encoder = s.encoder_flops_per_image * images
    projector = s.projector_eval_flops_per_image * images + entropy_flops(s, images)
    prefill = 2 * s.llm_decoder_params * prompt_tokens + 2 * s.llm_head_params * images
    decode = 2 * s.llm_params * images * max(new_tokens - 1, 0)
    return {"encoder": encoder, "projector": projector, "prefill": prefill, "decode": decode,
            "total": encoder + projector + prefill + decode}


def decode_bytes_per_step(s: Shapes, *, sequences: int, context: float) -> dict[str, float]:
    """Bytes one decode step must read: every LLM matmul weight and norm, one embedding row per sequence, and
    the KV cache of `context` earlier positions (K and V, every layer)."""
    weights = (s.llm_params * s.compute_bytes + s.llm_other_weight_bytes
               + sequences * s.hidden * s.compute_bytes)
    kv = 2 * s.layers * sequences * context * s.kv_heads * s.head_dim * s.compute_bytes
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


# ------------------------------------------------------------------------------------------------ memory model
def saved_per_token_layer(s: Shapes) -> int:
    """Bytes autograd keeps per token and decoder layer when the LLM's weights are frozen and its input needs a
    gradient (transformers' Llama with sdpa; no Linear input is kept, frozen weights need no weight gradient):
    q, k, v and the attention output with sdpa's fp32 logsumexp per head; the MLP's gate, up and silu(gate);
    each RMSNorm's fp32 input and its fp32 1/rms."""
    c = s.compute_bytes
    attention = c * (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim) + FP32 * s.heads
    mlp = 3 * c * s.ffn
    norms = 2 * (FP32 * s.hidden + FP32)
    return attention + mlp + norms


def training_activations(s: Shapes, *, llm_tokens: int, answer_tokens: int, sequences: int, length: int,
                         images: int) -> dict[str, int]:
    """Saved-for-backward bytes of one training micro-step, by where they are kept."""
    layers = s.layers * saved_per_token_layer(s) * llm_tokens
    final = llm_tokens * (FP32 * s.hidden + FP32) + 2 * length * s.head_dim * s.compute_bytes  # final norm; cos, sin
    logits = answer_tokens * s.vocab * FP32  # log_softmax output of the fp32 cross-entropy, answer positions only
    # VIB: ε and σ of every sample (fp32), the sampled tokens in the LLM dtype, the σ head's pre-softplus values
    samples = sequences // images
    vib = images * s.visual_tokens * s.hidden * (2 * samples * FP32 + samples * s.compute_bytes + FP32)
    return {"llm_layers": layers, "final_norm_rope": final, "loss_logits": logits, "projector_vib": vib,
            "total": layers + final + logits + vib}


def memory_model(s: Shapes, *, runtime_bytes: int, llm_tokens: int, answer_tokens: int, sequences: int, length: int,
                 images: int) -> dict[str, Any]:
    """Peak of the training micro-step, term by term: the runtime (the process before the model exists, measured),
    the weights, the saved activations, the optimizer (fp32 gradients + AdamW's two moments of the trainable
    parameters), and the loss's transient at the start of the backward pass (beside the saved fp32 log-softmax: the
    dense fp32 gradients of the NLL and of the log-softmax input, then their cast back to the LLM dtype)."""
    activations = training_activations(s, llm_tokens=llm_tokens, answer_tokens=answer_tokens, sequences=sequences,
                                       length=length, images=images)
    optimizer = 3 * s.trainable_params * FP32
    transient = answer_tokens * s.vocab * (2 * FP32 + s.compute_bytes)
    terms = {"runtime": runtime_bytes, "weights": s.total_weight_bytes, "activations": activations["total"],
             "optimizer": optimizer, "loss_transient": transient}
    return {"terms": terms, "total": sum(terms.values()), "activations": activations,
            "weights_by_part": dict(s.weight_bytes)}


def entropy_transient(s: Shapes, rows: int) -> int:
    """vib.similarity_entropy: one fp32 slice of the table, and the fp32 logits, p and p·log p of `rows` rows."""
    return ENTROPY_VOCAB_CHUNK * s.hidden * FP32 + 3 * rows * s.entropy_vocab * FP32


def generation_memory(s: Shapes, *, runtime_bytes: int, sequences: int, context: int) -> dict[str, Any]:
    """Peak of a generation batch: runtime + weights + the KV cache at its longest + the largest transient (the
    prefill MLP's three ffn-wide tensors of the whole prompt, or the similarity entropy's fp32 table slice)."""
    kv = 2 * s.layers * sequences * context * s.kv_heads * s.head_dim * s.compute_bytes
    transient = max(3 * sequences * context * s.ffn * s.compute_bytes + sequences * s.vocab * FP32,
                    entropy_transient(s, sequences))
    terms = {"runtime": runtime_bytes, "weights": s.total_weight_bytes, "kv_cache": kv, "prefill_transient": transient}
    return {"terms": terms, "total": sum(terms.values())}


def gb(nbytes: float) -> float:
    return nbytes / 1e9


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
