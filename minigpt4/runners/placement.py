"""Where the model lives during training: on the run device, where the builder put it, or sharded by FSDP.

* `place_model`: a plain model is moved to the run device; an 8-bit (bitsandbytes) LLM or a model whose ViT
  stays on the CPU (`model.low_resource`, `model.encoder_device: cpu`) is left where the builder placed it.
* `fsdp_wrap` (`run.distributed: fsdp`): the frozen parts are sharded over the ranks, the trainable projector is
  replicated, so checkpoints, optimizer state and gradient clipping work exactly as under DDP.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy

from minigpt4.models.checkpoints import FSDP_PREFIX

log = logging.getLogger(__name__)


def has_fixed_placement(model: nn.Module) -> bool:
    """True when the builder placed the model deliberately: an 8-bit (bitsandbytes) LLM, which `.to()` must
    not touch, or parts on different devices (model.encoder_device: cpu keeps the ViT off a small GPU)."""
    quantized = any(getattr(m, "is_quantized", False) or getattr(m, "hf_device_map", None) for m in model.modules())
    return quantized or len({p.device for p in model.parameters()}) > 1


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a plain model to the run device; leave a deliberately placed one where it is, but insist that
    its trainable parameters (what the optimizer and DDP work on) are on the run device."""
    if not has_fixed_placement(model):
        return model.to(device)
    elsewhere = [f"{n} ({p.device})" for n, p in model.named_parameters() if p.requires_grad and p.device != device]
    if elsewhere:
        raise ValueError(f"trainable parameters are not on the run device {device}: {', '.join(elsewhere[:5])}")
    log.info("model kept where the builder placed it (8-bit LLM or parts on several devices)")
    return model


# ---- FSDP (run.distributed: fsdp) -------------------------------------------------------------------------------


def fsdp_wrap(model: nn.Module, device: torch.device) -> FullyShardedDataParallel:
    """Shard the frozen model over the ranks and replicate what trains (run.distributed: fsdp).

    Units: every transformer block (the classes the Hugging Face modules list in `_no_split_modules`) and the
    `encoder` are sharded (FULL_SHARD): the frozen 7B LLM is spread over the GPUs instead of copied to each.
    Every module that holds a trainable parameter itself is a NO_SHARD unit: the projector (a few MB) stays
    whole on every rank with its gradients all-reduced, as under DDP, so the optimizer state, the clipping
    norm and the checkpoint tensors are full and identical on all ranks and the checkpoint format does not
    change. FSDP flattens each unit into one tensor of one dtype, which these units also respect (fp32
    projector, bf16 LLM). use_orig_params=True keeps the parameter objects the optimizer already holds.
    """
    if has_fixed_placement(model):
        raise ValueError("run.distributed: fsdp needs the whole model on one device; it cannot shard an 8-bit "
                         "LLM (model.low_resource) or a CPU encoder (model.encoder_device: cpu)")
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    encoder = getattr(model, "encoder", None)

    def unit(module: nn.Module) -> bool | dict[str, Any]:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return {"sharding_strategy": ShardingStrategy.NO_SHARD}
        return module is encoder or type(module).__name__ in blocks

    root_trains = any(p.requires_grad for p in model.parameters(recurse=False))
    return FullyShardedDataParallel(
        model, auto_wrap_policy=CustomPolicy(unit), use_orig_params=True, device_id=device,
        sharding_strategy=ShardingStrategy.NO_SHARD if root_trains else ShardingStrategy.FULL_SHARD,
        sync_module_states=False, limit_all_gathers=True,
    )


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """FSDP wraps in place: the model's own parameter names then run through its wrapper modules."""
    return any(FSDP_PREFIX in name for name, _ in model.named_parameters())
