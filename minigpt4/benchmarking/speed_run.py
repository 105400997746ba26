"""The speed benchmark (scripts/benchmark.py) from start to end: the rows asked for, the 8-bit low-resource
training peak (7B), the targets judged, and the JSON and Markdown written."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from minigpt4.benchmarking.measure import Report, format_value
from minigpt4.benchmarking.speed_rows import (
    chair_rows,
    loader_row,
    opera_rows,
    pope_rows,
    training_rows,
    vcd_rows,
)
from minigpt4.benchmarking.speed_setup import GPU_TARGETS, build, llm_matmul_params, start
from minigpt4.benchmarking.workloads import model_loss, time_training, training_batches, write_images
from minigpt4.common.results_header import results_header


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = start(args)
    if args.low_resource:
        bench.results["low_resource"] = low_resource_run(args, bench.device, bench.tokenizer_dir, bench.workdir,
                                                         bench.preset)
        return finish(bench.results, bench.out, Report(False))
    bench.model, _ = build(args.size, bench.device, bench.tokenizer_dir)
    bench.report = Report(strict_identical=bench.device.type == "cpu")
    bench.meta.update(llm_matmul_params=llm_matmul_params(bench.model), num_samples=bench.model.vib.num_samples,
                      amp="bf16" if bench.device.type == "cuda" else "none (fp32)")
    if "train" not in args.skip:
        training_rows(bench)
    if "loader" not in args.skip:
        loader_row(bench)
    eval_images = max(bench.preset["pope_images"], bench.preset["chair_images"])
    bench.eval_paths = write_images(bench.workdir / "val2014", eval_images, seed=1)
    for name, rows in (("pope", pope_rows), ("vcd", vcd_rows), ("opera", opera_rows), ("chair", chair_rows)):
        if name not in args.skip:
            rows(bench)
    bench.results["extrapolated"] = bench.extrapolated
    bench.meta["benchmark_s"] = time.perf_counter() - bench.began
    return finish(bench.results, bench.out, bench.report)


def low_resource_run(args, device: torch.device, tokenizer_dir: str, workdir: Path, preset: dict) -> dict[str, Any]:
    """Training peak memory with the LLM in 8 bits, through the builder's real loading path: a random 7B LLM is
    saved once in Hugging Face format, then `model.low_resource: true` loads it with bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return {"skipped": f"bitsandbytes is not importable ({err})"}
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minigpt4.models.from_config import LLM_PRESETS
    from minigpt4.models.loading import random_init

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    llm_dir = workdir / "random_vicuna_7b"
    started = time.perf_counter()
    # Materialised once, in bf16, on the device (not built in fp32 and cast: 27 GB for a moment at 7B).
    config = LlamaConfig(**LLM_PRESETS["vicuna-7b"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llm = random_init(LlamaForCausalLM, config, torch.bfloat16, device)
    llm.save_pretrained(llm_dir)
    del llm
    torch.cuda.empty_cache()
    saved_s = time.perf_counter() - started
    model, _ = build("7b", device, tokenizer_dir, llm_path=str(llm_dir), low_resource=True,
                     encoder_device=args.encoder_device)
    batches = training_batches(model, 4, preset["train_batch"], model.encoder.vision_config.image_size, device)
    timing = time_training(model, batches, model_loss, steps=max(3, preset["steps"] // 4), warmup=1,
                           accum=preset["accum"], device=device, amp=True)
    peak_gb = timing["peak_mb"] / 1024
    limit = GPU_TARGETS["low_resource_peak_gb_max"]
    return {**timing, "peak_gb": peak_gb, "encoder_device": args.encoder_device or "cuda",
            "random_llm_written_s": saved_s, "target_gb": limit, "meets_target": peak_gb <= limit}


def targets(results: dict[str, Any], report: Report) -> dict[str, Any]:
    """The targets this run can judge: pass (True), FAIL (False) or not measured (None)."""
    rows = {r["name"].split(" (")[0]: r for r in report.rows}
    meta, ext, checks = results["meta"], results.get("extrapolated", {}), {}
    if meta["device"] == "cpu" and not meta["quick"]:
        if "POPE: batching" in rows:
            r = rows["POPE: batching"]
            checks["cpu: batched POPE >= 3x batch 1, identical answers"] = (
                (r["speedup"] or 0) >= 3 and bool(r["identical"]))
        if "train: encoder passes per image" in rows:
            speedup = rows["train: encoder passes per image"]["speedup"]
            checks["cpu: encoder once faster than S times"] = (speedup or 0) > 1
    if meta["size"] == "7b" and meta["device"] != "cpu" and ext:
        t = GPU_TARGETS
        goals = (("epoch 5,000 pairs <= 3 min", "epoch_5000_pairs_s", t["epoch_s_max"], True),
                 ("MFU >= 40 % (4·N)", "mfu", t["mfu_min"], False),
                 ("POPE 8,910 questions <= 1 min", "pope_8910_s", t["pope_8910_s_max"], True),
                 ("CHAIR 500 × 256 tokens <= 1 min", "chair_500_s", t["chair_500x256_s_max"], True),
                 ("training peak <= 40 GB", "train_peak_gb", t["train_peak_gb_max"], True))
        for name, key, limit, below in goals:
            value = ext.get(key)
            checks[f"gpu: {name}"] = None if value is None else (value <= limit if below else value >= limit)
    if "low_resource" in results and "peak_gb" in results["low_resource"]:
        checks["gpu: low_resource training peak <= 24 GB"] = results["low_resource"]["meets_target"]
    return checks


def finish(results: dict[str, Any], out: Path, report: Report) -> dict[str, Any]:
    """Judge the targets, write OUT (JSON) and OUT.md (the table), print the table."""
    results["rows"] = report.rows
    results["meta"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results, report)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = markdown(results, report)
    out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return results


def markdown(results: dict[str, Any], report: Report) -> str:
    """OUT.md: the header line (date, machine, commit), the table, the extrapolations and the targets."""
    meta = results["meta"]
    gpu = meta["device_name"] if meta["gpu_measured"] else None
    lines = [results_header(meta["load_average_before"], gpu=gpu), "",
             f"Benchmark on {meta['device_name']} ({meta['device']}, {meta['cpu_cores']} CPU cores, load average "
             f"{meta['load_average_before']} before / {meta['load_average_after']} after), size {meta['size']}",
             "", report.table(), ""]
    for key, value in results.get("extrapolated", {}).items():
        lines.append(f"- {key}: {format_value(value) if isinstance(value, (int, float)) else value}")
    for key, value in results["targets"].items():
        verdict = "pass" if value else ("not measured" if value is None else "FAIL")
        lines.append(f"- target {key}: {verdict}")
    if "low_resource" in results:
        lines.append(f"- low_resource: {json.dumps(results['low_resource'], default=str)}")
    lines.append(f"- {meta['mfu_formula']}")
    return "\n".join(lines)
