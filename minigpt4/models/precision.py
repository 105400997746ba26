"""`model.precision`: one setting for the dtype of every part of the model and the autocast around it.

| precision   | ViT                         | ln_vision, Q-Former | projector | LLM  | autocast | run.amp (training)  |
|-------------|-----------------------------|---------------------|-----------|------|----------|---------------------|
| `auto`      | `model.encoder_dtype`       | same as the ViT     | fp32      | `model.llm_dtype` | none | as set  |
| `fp32`      | fp32                        | fp32                | fp32      | fp32 | none     | none                |
| `bf16`      | bf16                        | bf16                | fp32      | bf16 | none     | bf16                |
| `reference` | Linear/Conv fp16, rest fp32 | fp32                | fp32      | fp16 | fp16     | fp16 + GradScaler   |

(`auto` dtypes: bf16 on a GPU, fp32 on the CPU; LayerNorms such as `ln_vision` always compute in fp32.)

`reference` is how MiniGPT-4 and AdaVIB ran, read from their code:
* ViT: LAVIS `convert_weights_to_fp16` turns the weights and biases of every Linear/Conv layer of the EVA ViT to
  fp16 and leaves norms, CLS token and position embeddings in fp32 (Vision-CAIR/MiniGPT-4
  minigpt4/models/eva_vit.py, `create_eva_vit_g(precision="fp16")`); `ln_vision` is a separate fp32 LayerNorm
  (minigpt4/models/base_model.py `init_vision_encoder`). With the ViT on the CPU (`model.encoder_device: cpu`,
  MiniGPT-4's `vit_to_cpu`) the ViT is cast back to fp32, as there.
* Q-Former, query tokens and `llama_proj` are built as fp32 modules and never cast (minigpt4/models/minigpt4.py,
  jiaqi5598/AdaVIB minigpt4/models/mini_gpt4.py).
* LLM: `LlamaForCausalLM.from_pretrained(..., torch_dtype=torch.float16)` (both repositories).
* Autocast: MiniGPT-4 wraps `encode_img`, the LM forward and `generate` in `torch.cuda.amp.autocast(fp16)`
  (`maybe_autocast`); AdaVIB trains and evaluates under Lightning's `MixedPrecision('16-mixed')` with a
  `GradScaler` (AdaVIB finetune.py, pope_eval.py). The model therefore runs its own fp16 autocast in training,
  evaluation and the demo alike, and training uses `run.amp: fp16` (GradScaler).
* CUDA only: the sources never ran on the CPU, and CPU autocast puts different ops in fp16 (norms, softmax), so
  the numbers would not be theirs. A CPU run is refused rather than silently different.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from minigpt4.common.config import ConfigError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.llm_dtype` / `model.encoder_dtype` (with `model.precision: auto`): auto is bf16 on a GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class PrecisionPlan:
    """What `model.precision` means for one build: the dtypes of the frozen parts and the model's own autocast
    (the projector always keeps fp32 master weights; it is the only trained part)."""

    name: str
    llm: torch.dtype
    encoder: torch.dtype  # every encoder tensor, before `vit_linear_fp16`
    vit_linear_fp16: bool = False  # then the ViT's Linear/Conv weights and biases in fp16 (LAVIS)
    autocast: torch.dtype | None = None  # autocast the model runs itself in (None: the caller decides)


def plan_precision(cfg, device: torch.device, encoder_device: torch.device | None = None) -> PrecisionPlan:
    """The plan for `cfg` (a `model:` section) on `device`, the ViT on `encoder_device` (default: `device`)."""
    encoder_device = device if encoder_device is None else encoder_device
    name = cfg.precision
    if name == "auto":
        llm_dtype = resolve_dtype(cfg.llm_dtype, device)
        return PrecisionPlan(name, llm_dtype, resolve_dtype(cfg.encoder_dtype, encoder_device))
    if name in ("fp32", "bf16"):
        return PrecisionPlan(name, _DTYPES[name], _DTYPES[name])
    if name != "reference":
        raise ConfigError(f"model.precision = {name!r}; expected one of auto, fp32, bf16, reference")
    if device.type not in ("cuda", "meta"):
        raise ConfigError(f"model.precision: reference reproduces the sources' CUDA fp16 autocast and needs a GPU "
                          f"(the model would run on {device.type}); use model.precision: fp32 there")
    vit_on_gpu = encoder_device.type != "cpu"  # MiniGPT-4's vit_to_cpu: the ViT goes back to fp32 on the CPU
    return PrecisionPlan(name, torch.float16, torch.float32, vit_linear_fp16=vit_on_gpu, autocast=torch.float16)


def convert_vit_to_fp16(vision_model: nn.Module) -> None:
    """LAVIS's `convert_weights_to_fp16` on the ViT: weight and bias of every Linear/Conv layer in fp16, norms,
    CLS token and position embeddings untouched (Vision-CAIR/MiniGPT-4 minigpt4/models/eva_vit.py).

    EVA keeps q_bias/v_bias as separate fp32 parameters and `F.linear` under autocast casts them to fp16; the
    fused `qkv.bias` here is cast once instead, which gives the same fp16 values.
    """
    for module in vision_model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.to(torch.float16)  # only this layer's own weight and bias


def place_encoder(encoder: nn.Module, plan: PrecisionPlan, device: torch.device) -> None:
    """Move the frozen encoder to `device` in the plan's dtypes."""
    encoder.to(device=device, dtype=plan.encoder)
    if plan.vit_linear_fp16:
        convert_vit_to_fp16(encoder.vision_model)


@contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside get their floating-point parameters in `dtype` from the start, as transformers'
    `from_pretrained(dtype=...)` builds them. A random-init model is then materialised once, in the dtype it runs
    in: building a 7B LLM in fp32 and casting it afterwards needs 27 GB for a moment, and `.to(bf16)` would also
    round RoPE's `inv_freq` buffer, which transformers computes and keeps in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
