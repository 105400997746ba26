"""The phases of scripts/fullsize_check.py: the real MiniGPT-4 7B (or LLaVA-1.5-7B) with random weights, built
through the project's builder straight into its dtype on its device; one AdaVIB training micro-step, one POPE
batch and one CHAIR caption through the real training and evaluation code, each timed, profiled and measured."""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers.generation.streamers import BaseStreamer

from minigpt4.benchmarking import costs
from minigpt4.benchmarking.measure import PeakMemory, sync
from minigpt4.benchmarking.workloads import POPE_OBJECTS, WORDS, quiet_progress_bars, time_generation, write_images

ARCHES = ("minigpt4", "llava15")
SIZES = ("tiny", "small", "7b")
# small: the real widths of the vision tower, the Q-Former and the vocabulary (the similarity entropy runs over all
# 32,000 rows), 2 blocks of each and a 2048-wide 2-layer LLM: about 0.6 GB in bf16, for checking the memory model.
SMALL_LLM = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=2, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6)
VOCAB = {"minigpt4": 32000, "llava15": 32064}  # Vicuna's; llava-hf pads it to 32,064
BASE_VOCAB = 32000  # llava-hf's tokenizer.vocab_size: the rows its similarity entropy runs over
PROTOCOL = {"pope": "opera-pope", "chair": "opera-chair-500"}  # the two that have prompts for both families
TRAINING_AMP = {"bf16": torch.bfloat16, "fp32": None}  # what the Runner trains under (common.config.TRAINING_AMP)


@dataclass(frozen=True)
class CheckSettings:
    arch: str = "minigpt4"
    size: str = "7b"
    device: str = "cpu"
    precision: str = "bf16"
    num_samples: int = 3  # S
    batch_size: int = 1
    caption_tokens: int = 100
    pope_questions: int = 2
    pope_new_tokens: int = 10
    chair_new_tokens: int = 32
    profile: bool = True
    seed: int = 0


def model_config(s: CheckSettings, tokenizer_dir: str, tokenizer_len: int) -> dict[str, Any]:
    """The `model:` section: random weights (no paths), the 7B presets or the small / tiny sizes."""
    from minigpt4.common.tiny_models import TINY_LLM, TINY_NUM_QUERY_TOKENS, TINY_QFORMER, TINY_VISION

    cfg: dict[str, Any] = dict(arch=s.arch, tokenizer_path=tokenizer_dir, precision=s.precision,
                               mm_projector_type="vib", max_txt_len=512,
                               vib=dict(num_samples=s.num_samples, beta=1e-7, adaptive=True))
    if s.arch == "llava15":
        cfg["prompt_template"] = "llava15"
    if s.size == "7b":
        cfg["llm_preset"] = "vicuna-7b" if s.arch == "minigpt4" else "vicuna-7b-v1.5"
    elif s.size == "small":
        cfg.update(vision=dict(num_hidden_layers=2), llm={**SMALL_LLM, "vocab_size": VOCAB[s.arch]})
        if s.arch == "minigpt4":
            cfg["qformer"] = dict(num_hidden_layers=2)
    else:
        cfg.update(vision=dict(TINY_VISION), llm={**TINY_LLM, "vocab_size": tokenizer_len})
        if s.arch == "minigpt4":
            cfg.update(qformer=dict(TINY_QFORMER), num_query_tokens=TINY_NUM_QUERY_TOKENS)
    return cfg


def adjust_random_model(model, s: CheckSettings, tokenizer_len: int) -> None:
    """LLaVA: the similarity entropy over llava-hf's 32,000 base tokens, not the tiny test tokenizer's few hundred.
    With weights: zero LM-head rows past the tokenizer, so every generated id decodes (the compute is unchanged)."""
    if s.arch == "llava15" and s.size != "tiny":
        model.entropy_vocab_size = min(BASE_VOCAB, model.llm.get_input_embeddings().weight.shape[0])
    head = model.llm.get_output_embeddings().weight
    if not head.is_meta:
        with torch.no_grad():
            head[tokenizer_len:].zero_()


# --------------------------------------------------------------------------------------------------- inputs
def make_caption(segments, tokens: int, seed: int) -> str:
    """Caption words until the tokenizer (`SegmentTokenizer`, as the model tokenizes) gives exactly `tokens` ids."""
    rng, words = random.Random(seed), []
    for _ in range(50 * tokens):
        candidate = words + [rng.choice(WORDS)]
        count = len(segments.encode(" ".join(candidate)))
        if count <= tokens:
            words = candidate
        if count == tokens:
            return " ".join(words)
    raise RuntimeError(f"could not build a caption of exactly {tokens} tokens from the benchmark words")


@dataclass
class Inputs:
    caption: str
    pope_prompts: list[str]
    chair_prompt: str
    image_paths: list[str] = field(default_factory=list)


def make_inputs(s: CheckSettings, segments) -> Inputs:
    from minigpt4.conversation.templates import format_eval_prompt
    from minigpt4.eval.protocols import PROTOCOLS

    pope, chair = (PROTOCOLS[PROTOCOL[t]].prompt_for(s.arch) for t in ("pope", "chair"))
    questions = [f"Is there a {POPE_OBJECTS[i % len(POPE_OBJECTS)]} in the image?" for i in range(s.pope_questions)]
    return Inputs(
        caption=make_caption(segments, s.caption_tokens, s.seed),
        pope_prompts=[format_eval_prompt(pope.prompt_format, system=pope.system, question=q) for q in questions],
        chair_prompt=format_eval_prompt(chair.prompt_format, system=chair.system,
                                        question=PROTOCOLS[PROTOCOL["chair"]].question))


@dataclass(frozen=True)
class Lengths:
    """Token counts of the workloads, as the model's own text builders lay them out."""

    train_length: int  # one training sequence: prompt + N visual slots + caption + end string
    caption_target: int  # labelled tokens of one sequence
    pope_width: int  # the left-padded POPE batch
    pope_prompt_tokens: int  # its non-padding tokens
    chair_width: int


def predicted_lengths(segments, template, end_sym: str, visual: int, inputs: Inputs, max_txt_len: int) -> Lengths:
    """The lengths `MiniGPT4.build_training_text` / `build_generation_text` will produce, before any model exists
    (for the memory line); `measured_lengths` on the built model must agree."""
    before, after = segments.prompt_ids(template.prompt(None))
    target = len(segments.encode(inputs.caption + end_sym)[:max_txt_len])
    pope = [sum(map(len, segments.prompt_ids(p))) + visual for p in inputs.pope_prompts]
    chair = sum(map(len, segments.prompt_ids(inputs.chair_prompt))) + visual
    return Lengths(len(before) + visual + len(after) + target, target, max(pope), sum(pope), chair)


def measured_lengths(model, inputs: Inputs) -> Lengths:
    text = model.build_training_text([None], [inputs.caption])
    pope = model.build_generation_text(inputs.pope_prompts)
    chair = model.build_generation_text([inputs.chair_prompt])
    return Lengths(text.input_ids.shape[1], int((text.labels != -100).sum()), pope.input_ids.shape[1],
                   int(pope.attention_mask.sum()), chair.input_ids.shape[1])


# ----------------------------------------------------------------------------------------------- measuring
class EncoderClock:
    """Wall time spent inside the frozen encoder's forward (hooks around it)."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        self.encoder, self.device, self.seconds, self.calls, self._start = encoder, device, 0.0, 0, 0.0
        self._handles: list = []

    def __enter__(self) -> "EncoderClock":
        def before(*_):
            sync(self.device)
            self._start = time.perf_counter()

        def after(*_):
            sync(self.device)
            self.seconds += time.perf_counter() - self._start
            self.calls += 1

        self._handles = [self.encoder.register_forward_pre_hook(before), self.encoder.register_forward_hook(after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


class StepClock(BaseStreamer):
    """A generation streamer that only notes the time: transformers calls `put` once with the prompt (before the
    prefill) and once after each new token, so the gaps are the prefill and each decode step."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


class SavedForBackward:
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages, parameters excluded)."""

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params and storage.nbytes():
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedForBackward":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def profiled(enabled: bool, device: torch.device) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield prof


# -------------------------------------------------------------------------------------------------- phases
def build_phase(cfg: dict[str, Any], device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The builder's own random-init path, on the device itself (the default device while building)."""
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        with torch.device(device):
            model = build_model(cfg, device=device)
        sync(device)
        seconds = time.perf_counter() - start
    return model, {"seconds": seconds, **memory.result()}


def training_phase(model, s: CheckSettings, inputs: Inputs, device: torch.device) -> dict[str, Any]:
    """One micro-step as the Runner takes it: forward under its autocast, backward, AdamW step (the recipe's)."""
    from minigpt4.runners.optim import build_optimizer

    size = _image_size(model)
    gen = torch.Generator().manual_seed(s.seed)
    batch = {"image": torch.randn(s.batch_size, 3, size, size, generator=gen).to(device),
             "answer": [inputs.caption] * s.batch_size}
    optimizer = build_optimizer(model, lr=3e-5, weight_decay=0.05, betas=(0.9, 0.999))
    trainable = {n: p.detach().flatten()[:64].clone() for n, p in model.named_parameters() if p.requires_grad}
    amp = TRAINING_AMP[s.precision]
    model.train()
    with PeakMemory(device) as memory, profiled(s.profile, device) as prof, \
            EncoderClock(model.encoder, device) as encoder:
        times = [time.perf_counter()]
        with SavedForBackward(model) as saved:
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                out = model(batch)
        times.append(_synced(device))
        out["loss"].backward()
        times.append(_synced(device))
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(_synced(device))
    result = {"seconds": times[-1] - times[0], "forward_s": times[1] - times[0], "backward_s": times[2] - times[1],
              "optimizer_s": times[3] - times[2], "encoder_s": encoder.seconds, "loss": float(out["loss"].detach()),
              "ce": float(out["ce"]), "grad_norm": grad_norm, "saved_for_backward_bytes": saved.nbytes,
              **memory.result(), "profile": prof}
    _check_training(model, result, trainable)
    return result


def _check_training(model, result: dict[str, Any], before: dict[str, torch.Tensor]) -> None:
    """A step that did not train is a wrong measurement: refuse it instead of reporting its time."""
    import math

    if not (math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0):
        raise RuntimeError(f"training step: loss {result['loss']}, gradient norm {result['grad_norm']}")
    params = dict(model.named_parameters())
    unchanged = [n for n, old in before.items() if torch.equal(params[n].detach().flatten()[:64], old)]
    if unchanged:
        raise RuntimeError(f"training step: the optimizer left {unchanged[:3]} unchanged")
    if any(p.grad is not None for p in model.parameters() if not p.requires_grad):
        raise RuntimeError("training step: a frozen parameter received a gradient")


def generation_phase(model, name: str, prompts: list[str], new_tokens: int, s: CheckSettings, inputs: Inputs,
                     workdir: Path, device: torch.device) -> dict[str, Any]:
    """One batch through the evaluation path (GenerationInputs + generate_all), forced to exactly `new_tokens`
    tokens: no stop strings, EOS suppressed until then (min_new_tokens), so every run decodes the same steps."""
    from minigpt4.eval.generate import GenerationItem

    if not inputs.image_paths:
        inputs.image_paths = write_images(workdir / "images", 2, seed=s.seed)
    items = [GenerationItem(key=f"{name}-{i}", image=inputs.image_paths[i % len(inputs.image_paths)], prompt=p)
             for i, p in enumerate(prompts)]
    quiet_progress_bars()
    clock = StepClock(device)
    kwargs = dict(min_new_tokens=new_tokens, stop_strings=[], streamer=clock)
    processor = "clip_image_eval" if s.arch == "llava15" else "blip2_image_eval"
    with PeakMemory(device) as memory, profiled(s.profile, device) as prof, \
            EncoderClock(model.encoder, device) as encoder:
        _, stats = time_generation(model, items, workdir, name, image_size=_image_size(model), batch_size=len(items),
                                   max_new_tokens=new_tokens, vis_processor=processor, generate_kwargs=kwargs)
    gaps = clock.gaps()
    if len(gaps) != new_tokens:
        raise RuntimeError(f"{name}: {len(gaps)} tokens generated, {new_tokens} forced")
    return {"seconds": stats["seconds"], "encoder_s": encoder.seconds, "prefill_s": gaps[0],
            "decode_step_s": gaps[1:], "sequences": len(items), "new_tokens": new_tokens, **memory.result(),
            "profile": prof}


def _synced(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def _image_size(model) -> int:
    encoder = model.encoder
    return (encoder.vision_config if hasattr(encoder, "vision_config") else encoder.config).image_size


# ------------------------------------------------------------------------------------------------ profile
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution")


def top_ops(prof, device: torch.device, path: Path, title: str, limit: int = 8) -> dict[str, Any]:
    """The profile table to `path`; the ops with the most self time, and how much of it went to matrix products
    (anything else is time the matmul units sit idle: memory-bound ops, Python, synchronisation)."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    path.write_text(f"torch.profiler, {title}, sorted by {attr}\n\n"
                    f"{prof.key_averages().table(sort_by=attr, row_limit=30)}\n")
    total = sum(getattr(e, attr) for e in events) or 1.0
    matmul = sum(getattr(e, attr) for e in events if e.key in MATMUL_OPS or "attention" in e.key)
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:limit]
    return {"profile_file": path.name, "self_time_s": total / 1e6, "matmul_and_attention_share": matmul / total,
            "top": [{"op": e.key, "self_s": getattr(e, attr) / 1e6, "share": getattr(e, attr) / total,
                     "calls": e.count} for e in top]}


def phase_costs(shapes: costs.Shapes, lengths: Lengths, s: CheckSettings) -> dict[str, Any]:
    """Model FLOPs and decode bytes of the three phases (costs.py has the formulas)."""
    sequences = s.num_samples * s.batch_size
    train = costs.train_flops(shapes, images=s.batch_size, sequences=sequences,
                              llm_tokens=sequences * lengths.train_length,
                              answer_tokens=sequences * lengths.caption_target)
    pope = costs.generation_flops(shapes, images=s.pope_questions, prompt_tokens=lengths.pope_prompt_tokens,
                                  new_tokens=s.pope_new_tokens)
    chair = costs.generation_flops(shapes, images=1, prompt_tokens=lengths.chair_width, new_tokens=s.chair_new_tokens)
    mid = lambda width, new: width + new / 2  # noqa: E731 - mean context over the decode steps
    return {"train": train, "pope": pope, "chair": chair,
            "pope_decode_bytes": costs.decode_bytes_per_step(
                shapes, sequences=s.pope_questions, context=mid(lengths.pope_width, s.pope_new_tokens)),
            "chair_decode_bytes": costs.decode_bytes_per_step(
                shapes, sequences=1, context=mid(lengths.chair_width, s.chair_new_tokens))}
