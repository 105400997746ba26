"""scripts/fullsize_check.py from start to end: the memory line before anything is built, the machine's own limits
(matmul rate, copy bandwidth) measured around the workload, the build and the three phases, and the report."""
from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from minigpt4.benchmarking import costs, hardware
from minigpt4.benchmarking.fullsize import (
    CheckSettings,
    adjust_random_model,
    build_phase,
    generation_phase,
    make_inputs,
    measured_lengths,
    model_config,
    phase_costs,
    predicted_lengths,
    top_ops,
    training_phase,
)
from minigpt4.benchmarking.fullsize_report import summarise, write_report

# Calibration sizes: large enough to be the machine's limit (matrices far beyond the caches, a buffer far beyond
# the last-level cache), small enough to take seconds. tiny keeps the CI run short; its ratios mean nothing.
CALIBRATION = {"tiny": dict(matmul=1024, copy=64 * 2**20), "small": dict(matmul=4096, copy=256 * 2**20),
               "7b": dict(matmul=4096, copy=256 * 2**20)}
CUDA_CALIBRATION = dict(matmul=8192, copy=2 * 2**30)


class NotEnoughMemory(RuntimeError):
    """The memory model's peak is more than the device has available (checked before anything is built)."""


def calibrate(device: torch.device, size: str, dtype: torch.dtype) -> dict[str, Any]:
    sizes = CUDA_CALIBRATION if device.type == "cuda" else CALIBRATION[size]
    return {"matmul": hardware.matmul_rate(device, dtype, sizes["matmul"]),
            "copy": hardware.copy_bandwidth(device, sizes["copy"])}


def plan(s: CheckSettings, workdir: Path, device: torch.device) -> dict[str, Any]:
    """Tokenizer, config, inputs and the memory model, from a meta-device model (no weights, no memory)."""
    from minigpt4.common.config import ModelConfig, merge, validate_model_config
    from minigpt4.common.tiny_models import train_tokenizer
    from minigpt4.conversation.templates import get_template
    from minigpt4.models.from_config import build_model
    from minigpt4.models.tokenization import SegmentTokenizer

    tokenizer = train_tokenizer(str(workdir / "tokenizer"))
    cfg = merge(ModelConfig, model_config(s, str(workdir / "tokenizer"), len(tokenizer)), where="model")
    validate_model_config(cfg, check_files=False)
    meta = build_model(cfg, device="meta")
    adjust_random_model(meta, s, len(tokenizer))
    segments = SegmentTokenizer(tokenizer)
    inputs = make_inputs(s, segments)
    template = get_template(cfg.prompt_template)
    end_sym = template.end_sym if cfg.end_sym is None else cfg.end_sym
    lengths = predicted_lengths(segments, template, end_sym, meta.num_query_tokens, inputs, cfg.max_txt_len)
    shapes = costs.read_shapes(meta)
    runtime = hardware.rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    return {"cfg": cfg, "tokenizer_len": len(tokenizer), "inputs": inputs, "lengths": lengths, "shapes": shapes,
            "memory": memory_models(shapes, lengths, s, runtime)}


def memory_models(shapes: costs.Shapes, lengths, s: CheckSettings, runtime: int) -> dict[str, Any]:
    sequences = s.num_samples * s.batch_size
    train = costs.memory_model(shapes, runtime_bytes=runtime, llm_tokens=sequences * lengths.train_length,
                               answer_tokens=sequences * lengths.caption_target, sequences=sequences,
                               length=lengths.train_length, images=s.batch_size)
    pope = costs.generation_memory(shapes, runtime_bytes=runtime, sequences=s.pope_questions,
                                   context=lengths.pope_width + s.pope_new_tokens)
    chair = costs.generation_memory(shapes, runtime_bytes=runtime, sequences=1,
                                    context=lengths.chair_width + s.chair_new_tokens)
    build = {"terms": {"runtime": runtime, "weights": shapes.total_weight_bytes},
             "total": runtime + shapes.total_weight_bytes}
    return {"build": build, "train": train, "pope": pope, "chair": chair,
            "peak": max(m["total"] for m in (build, train, pope, chair))}


def memory_line(memory: dict[str, Any], device: torch.device) -> tuple[str, bool]:
    """One line, before anything is built: does the device have what the memory model says the peak needs?"""
    terms = memory["train"]["terms"]
    parts = " + ".join(f"{name} {costs.gb(v):.2f}" for name, v in terms.items())
    available = hardware.available_bytes(device)
    fits = available is None or memory["peak"] <= available
    have = "unknown" if available is None else f"{costs.gb(available):.1f} GB"
    verdict = "fits" if fits else "does NOT fit"
    where = "MemAvailable" if device.type == "cpu" else "free GPU memory"
    return (f"memory: the peak (training) needs {costs.gb(memory['peak']):.2f} GB = {parts} GB; {where} here is "
            f"{have}: {verdict}", fits)


def run_check(s: CheckSettings, out: Path, *, workdir: Path | None = None, force: bool = False) -> dict[str, Any]:
    """The whole check; raises NotEnoughMemory (before building) when the machine does not have the memory."""
    device = torch.device("cuda", 0) if s.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[s.precision]
    began, load_before = time.perf_counter(), os.getloadavg()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="minigpt4-fullsize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    planned = plan(s, workdir, device)
    line, fits = memory_line(planned["memory"], device)
    print(line, flush=True)
    if not fits and not force:
        raise NotEnoughMemory(line)
    results: dict[str, Any] = {"settings": asdict(s), "memory_line": line, "memory_fits": fits,
                               "machine": hardware.machine_facts(device), "load_average_before": load_before,
                               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    results["calibration_start"] = calibrate(device, s.size, dtype)
    hardware.release_freed_memory(device)
    # The runtime term as the build finds it (imports, tokenizer, calibration kernels' caches), not as planned.
    runtime = hardware.rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    memory = memory_models(planned["shapes"], planned["lengths"], s, runtime)
    model, results["build"] = build_phase(planned["cfg"], device)
    adjust_random_model(model, s, planned["tokenizer_len"])
    _same_as_planned(model, planned)
    results["phases"] = run_phases(model, s, planned, workdir, out, device)
    del model
    results["calibration_end"] = calibrate(device, s.size, dtype)
    results["load_average_after"] = os.getloadavg()
    results["costs"] = phase_costs(planned["shapes"], planned["lengths"], s)
    results["formulas"] = costs.FORMULAS
    results["memory_model"] = memory
    results["memory_model_planned"] = planned["memory"]
    results["lengths"] = asdict(planned["lengths"])
    results["shapes"] = asdict(planned["shapes"])
    results["total_s"] = time.perf_counter() - began
    return write_report(summarise(results), out)


def run_phases(model, s: CheckSettings, planned: dict[str, Any], workdir: Path, out: Path,
               device: torch.device) -> dict[str, Any]:
    inputs = planned["inputs"]
    phases = {}
    for name in ("train", "pope", "chair"):
        hardware.release_freed_memory(device)
        print(f"fullsize: {name} ...", flush=True)
        if name == "train":
            result = training_phase(model, s, inputs, device)
        else:
            prompts = inputs.pope_prompts if name == "pope" else [inputs.chair_prompt]
            new = s.pope_new_tokens if name == "pope" else s.chair_new_tokens
            result = generation_phase(model, name, prompts, new, s, inputs, workdir, device)
        prof = result.pop("profile")
        if prof is not None:
            path = out.with_name(f"{out.stem}_{name}_profile.txt")
            result["profile"] = top_ops(prof, device, path, f"{s.arch} {s.size} {name}")
        phases[name] = result
        print(f"fullsize: {name} {result['seconds']:.1f} s, peak {result['peak_mb'] / 1024:.2f} GiB", flush=True)
    return phases


def _same_as_planned(model, planned: dict[str, Any]) -> None:
    """The meta-device plan (memory line, FLOPs) must describe the model that was built, or its numbers are wrong."""
    built = costs.read_shapes(model)
    if built != planned["shapes"]:
        diff = {k: (v, getattr(built, k)) for k, v in asdict(planned["shapes"]).items() if getattr(built, k) != v}
        raise AssertionError(f"the built model differs from its meta-device plan: {diff}")
    lengths = measured_lengths(model, planned["inputs"])
    if lengths != planned["lengths"]:
        raise AssertionError(f"token counts differ from the plan: built {lengths}, planned {planned['lengths']}")
