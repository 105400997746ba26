"""Why a training loss is not finite: a config value, the weights, or the inputs.

The runner skips a step whose loss is not finite (one overflow can pass), and asks `diagnose` why. A cause that
cannot pass -- a NaN or inf config value (e.g. model.vib.beta=nan), or non-finite weights -- stops the run at
once with its name; bad inputs are named and the step is skipped as before. Only when none of the three is to
blame is the advice the old one (a lower learning rate, clipping, bf16 instead of fp16).

Config validation refuses NaN/inf values before a run starts; this is the second line, for values that reach
the model another way. Everything here runs only after a non-finite loss, so its cost (one pass over the
weights, one re-encoding of the step's images) does not touch normal steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from minigpt4.common import dist
from minigpt4.common.config import ConfigError
from minigpt4.models.checkpoints import key_listing, trainable_tensors
from minigpt4.models.numerics import nonfinite_tensors
from minigpt4.runners.placement import is_fsdp_wrapped

log = logging.getLogger(__name__)

GENERIC_ADVICE = "lower run.init_lr, set run.max_grad_norm, use run.amp: bf16 instead of fp16, or check the data"


class NonFiniteLossError(RuntimeError):
    """Training cannot go on: the loss is not finite and the cause will not pass by skipping steps."""


@dataclass
class Diagnosis:
    config: list[str] = field(default_factory=list)  # "model.vib.beta = nan"
    weights: list[str] = field(default_factory=list)  # sentences naming parameters
    inputs: list[str] = field(default_factory=list)  # sentences naming samples

    @property
    def blame(self) -> str | None:
        """The first cause found, in order of how directly it explains the rest."""
        return next((name for name in ("config", "weights", "inputs") if getattr(self, name)), None)

    def explain(self) -> str:
        if self.config:
            return ("a config value is to blame: " + "; ".join(self.config)
                    + ". Set it to a finite number (and a non-finite learning rate makes the weights NaN too)")
        if self.weights:
            return "the weights are to blame: " + " ".join(self.weights)
        if self.inputs:
            return "the inputs are to blame: " + " ".join(self.inputs)
        return ("the config values, the weights and this step's inputs are all finite, so the computation "
                "overflowed: " + GENERIC_ADVICE)


def config_problems(values: Mapping[str, Any]) -> list[str]:
    """`key = value` for every value that is a number but not a finite one."""
    return [f"{key} = {value!r}" for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value)]


def weight_problems(model: nn.Module, steps_applied: int) -> list[str]:
    bad = nonfinite_tensors(model)
    if not bad:
        return []
    trainable = set(trainable_tensors(model))
    grown = [n for n, _ in bad if n in trainable]
    frozen = [n for n, _ in bad if n not in trainable]
    found = []
    if grown and steps_applied:
        found.append(f"trainable parameter(s) {key_listing(grown, 6)} became NaN/inf after {steps_applied} optimizer "
                     "step(s): the updates overflowed; lower run.init_lr or set run.max_grad_norm.")
    elif grown:
        found.append(f"trainable parameter(s) {key_listing(grown, 6)} hold NaN/inf before any optimizer step: "
                     "the loaded weights (model.ckpt / model.projector_path / model.full_ckpt) are damaged.")
    if frozen:
        found.append(f"frozen parameter(s) or buffer(s) {key_listing(frozen, 6)} hold NaN/inf: the loaded "
                     "weights are damaged or overflow their dtype (check the weight files and model.*_dtype).")
    return found


def _sample_names(batch: Mapping[str, Any], rows: torch.Tensor) -> str:
    ids = batch.get("id")
    picked = rows.nonzero().flatten().tolist()
    if isinstance(ids, (list, tuple)) and len(ids) == rows.numel():
        return "sample(s) " + key_listing([str(ids[i]) for i in picked], 6)
    return f"batch row(s) {picked[:6]}"


def _nonfinite_rows(tensor: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(tensor.reshape(tensor.shape[0], -1).float()).all(dim=1)


def input_problems(model: nn.Module, batches: Sequence[Any], *, rerun_model: bool,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> list[str]:
    """Non-finite input tensors (pixels, cached features, any float entry), then, with `rerun_model`, image
    embeddings (the encoder's output) and visual tokens (the projector's output) of finite pixels."""
    found = []
    for batch in batches:
        if not isinstance(batch, Mapping):
            continue
        bad_input = False
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1 and value.numel():
                rows = _nonfinite_rows(value)
                if rows.any():
                    bad_input = True
                    found.append(f"{key!r} of {_sample_names(batch, rows)} holds NaN/inf values.")
        if rerun_model and not bad_input:
            found += _embedding_problems(model, batch, autocast)
    return found


def _embedding_problems(model: nn.Module, batch: Mapping[str, Any], autocast: Callable[[], Any]) -> list[str]:
    if not (hasattr(model, "encode_images") and hasattr(model, "project")):
        return []
    device = next(model.parameters()).device
    rng_devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices), autocast():  # training RNG streams untouched
        if batch.get("image_features") is not None:
            features = batch["image_features"]
        elif isinstance(batch.get("image"), torch.Tensor):
            features = model.encode_images(batch["image"])
            rows = _nonfinite_rows(features)
            if rows.any():
                return [f"the image embeddings (encoder output) of {_sample_names(batch, rows.cpu())} are NaN/inf "
                        f"although the pixels are finite: the encoder overflows in {features.dtype} "
                        "(try model.encoder_dtype: bf16 or fp32)."]
        else:
            return []
        tokens, _ = model.project(features, num_samples=1)
    rows = _nonfinite_rows(tokens[: features.shape[0]])
    if rows.any():
        return [f"the visual tokens (projector output) of {_sample_names(batch, rows.cpu())} are NaN/inf "
                "although the image embeddings are finite."]
    return []


def diagnose(model: nn.Module, batches: Sequence[Any], config_values: Mapping[str, Any], *, steps_applied: int,
             rerun_model: bool, autocast: Callable[[], Any] = contextlib.nullcontext) -> Diagnosis:
    """Collective under DDP/FSDP: every rank calls it for the same step (the non-finite flag is all-reduced),
    and the ranks agree on whether the weights are to blame (an FSDP shard may hold the bad values)."""
    diagnosis = Diagnosis(config=config_problems(config_values), weights=weight_problems(model, steps_applied),
                          inputs=input_problems(model, batches, rerun_model=rerun_model, autocast=autocast))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dist.is_dist() and dist.all_reduce_sum(torch.tensor([float(bool(diagnosis.weights))], device=device)).item() \
            and not diagnosis.weights:
        diagnosis.weights = ["another rank's shard of the weights holds NaN/inf (see its log)."]
    return diagnosis


def training_config_values(model: nn.Module, cfg: Any, lr: float) -> dict[str, Any]:
    """The numbers a training step's loss and update are made from, under the config keys that set them."""
    vib = getattr(model, "vib", None)  # MiniGPT4.vib: the VIB projector's settings (None for the linear one)
    values = {"model.vib.beta": getattr(vib, "beta", None)}
    for key in ("init_lr", "min_lr", "warmup_lr", "weight_decay", "adam_eps", "max_grad_norm"):
        values[f"run.{key}"] = getattr(cfg, key, None)
    values["the learning rate of this step"] = lr
    return values


def explain_nonfinite_loss(model: nn.Module, batches: Sequence[Any], cfg: Any, *, lr: float, step: int,
                           steps_applied: int, amp_dtype: torch.dtype | None) -> Diagnosis:
    """Diagnose a non-finite loss at `step`. A config value to blame: ConfigError (a user's mistake, one line);
    the weights: NonFiniteLossError; both stop the run now, since skipping steps cannot mend them. The inputs:
    a warning naming the samples, and the runner skips the step as before."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    diagnosis = diagnose(model, batches, training_config_values(model, cfg, lr), steps_applied=steps_applied,
                         rerun_model=not is_fsdp_wrapped(model), autocast=autocast)
    message = f"step {step}: the loss is not finite; {diagnosis.explain()}"
    if diagnosis.blame == "config":
        raise ConfigError(message)
    if diagnosis.blame == "weights":
        raise NonFiniteLossError(message)
    log.warning("%s", message)
    return diagnosis
