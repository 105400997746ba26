#!/usr/bin/env python
"""Speed benchmark: every optimization against the straightforward path it replaces, on the same inputs, in one run.

    python scripts/benchmark.py --device cpu --size tiny --out out/bench/cpu_tiny.json
    python scripts/benchmark.py --device cuda --size 7b --out out/bench/gpu_7b.json     # random 7B weights, bf16
    python scripts/benchmark.py --device cuda --size 7b --low-resource --out out/bench/gpu_7b_lowres.json

Nothing is downloaded: weights are random (the tiny tokenizer is trained offline), images are generated JPEGs.
Greedy decoding is made margin-safe by scaling the LM head ×20 (as tests/test_evaluate.py does), so batched and
batch-1 answers can be compared for identity; on CPU (fp32) any difference aborts the run.

Rows (optimized | baseline):
  train  encoder once per image                 | encoder re-run for each of the S noise samples
  train  padding trimmed to each batch          | every batch padded to prompt + max_txt_len
  train  sdpa attention (LLM)                   | eager attention
  train  bf16 autocast, fp32 where it matters   | fp32 weights, no autocast            (GPU only)
  data   loader workers (+ pinned memory on GPU) | loading in the training process
  POPE   batched, sorted by prompt length       | batch 1                              answers identical
  POPE   sorted by prompt length                | unsorted                             answers identical
  POPE   feature cache (first / later run)      | encoder per question                 answers identical
  POPE   KV cache                               | no KV cache                          answers identical
  CHAIR  batched                                | batch 1                              captions identical
  VCD    greedy decoding, batched and batch 1    | VCD (eval.decoding = vcd), same questions: its cost factor
  VCD    batched                                | batch 1                              answers identical
  OPERA  greedy and beam search (same beams)    | OPERA (eval.decoding = opera), same captions: its cost factor
  OPERA  batched                                | batch 1                              captions identical

Model FLOPs utilisation (GPU): the frozen LLM's forward costs 2·N FLOPs per token and its backward, which
computes activation gradients only (the LLM has no weight gradients), another 2·N: 4·N per training token,
N = LLM parameters without the input-embedding table (a lookup, not a matmul); tokens = the non-padding tokens
of all S·B sequences. The ViT, Q-Former and projector are not counted. MFU = 4·N·tokens/s / peak bf16 FLOP/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from minigpt4.benchmarking.decoding_costs import decoding_cost_rows, generation_timer  # noqa: E402
from minigpt4.benchmarking.measure import Report, format_value, interleaved, peak_tflops  # noqa: E402
from minigpt4.benchmarking.workloads import (  # noqa: E402
    chair_items, check_reference, loader_throughput, model_loss, pope_items, profile_training, quiet_progress_bars,
    reference_forward, time_generation, time_training, training_batches, write_images)

GPU_TARGETS = {"epoch_s_max": 180.0, "mfu_min": 0.40, "pope_8910_s_max": 60.0, "chair_500x256_s_max": 60.0,
               "train_peak_gb_max": 40.0, "low_resource_peak_gb_max": 24.0}


# ------------------------------------------------------------------------------------------------ the model
def build(size: str, device: torch.device, tokenizer_dir: str, *, llm_path: str | None = None,
          low_resource: bool = False, encoder_device: str | None = None):
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    if size == "tiny":
        cfg = tiny_model_config(tokenizer_dir, "vib", llm_dtype="auto", encoder_dtype="auto")
    else:  # MiniGPT-4 7B shapes: EVA ViT-g (39 blocks), BERT-base Q-Former, 32 queries, Vicuna-7B; S = 3
        cfg = dict(arch="minigpt4", tokenizer_path=tokenizer_dir, llm_preset="vicuna-7b", mm_projector_type="vib",
                   llm_path=llm_path, low_resource=low_resource, encoder_device=encoder_device,
                   vib=dict(num_samples=3, beta=1e-7, adaptive=True), max_txt_len=512)
    # Random init directly on the device: a 7B model initialised on the CPU would take minutes.
    with torch.device(device) if llm_path is None else contextlib.nullcontext():
        model = build_model(cfg, device=device)
    head = model.llm.lm_head.weight
    if head.dtype.is_floating_point:  # (bitsandbytes keeps the LM head unquantized)
        with torch.no_grad():
            head.mul_(20.0)  # margin-safe greedy decoding (see module docstring)
            # 7B: the LLM keeps Vicuna's 32,000-way head (same compute) but the offline tokenizer knows only its
            # first few hundred ids; zero logits for the rest keep greedy answers decodable, hence comparable.
            if model.tokenizer is not None:
                head[len(model.tokenizer):].zero_()
    return model, cfg


def llm_matmul_params(model) -> int:
    embed = model.llm.get_input_embeddings().weight
    return sum(p.numel() for p in model.llm.parameters() if p is not embed)


# --------------------------------------------------------------------------------------------------- main
PRESETS: dict[str, dict[str, int]] = {
    # smoke test: every row, smallest sizes (seconds on 2 cores); timings meaningless
    "quick": dict(train_batch=2, steps=2, warmup=1, baseline_steps=2, accum=1, pope_images=2, pope_per_image=3,
                  pope_batch=8, pope_baseline_items=6, chair_images=2, chair_tokens=4, chair_batch=2,
                  chair_baseline_items=2, loader_images=8, loader_batch=4, repeats=1, profile_steps=1, vcd_items=6,
                  vcd_baseline_items=3, opera_items=2, opera_baseline_items=1, opera_tokens=12),
    "tiny": dict(train_batch=4, steps=30, warmup=3, baseline_steps=30, accum=1, pope_images=16, pope_per_image=6,
                 pope_batch=32, pope_baseline_items=96, chair_images=16, chair_tokens=32, chair_batch=16,
                 chair_baseline_items=16, loader_images=96, loader_batch=8, repeats=5, profile_steps=3,
                 vcd_items=96, vcd_baseline_items=24, opera_items=16, opera_baseline_items=4,
                 opera_tokens=32),
    # 7B: micro-batch 4 × accumulation 4 = effective batch 16; S = 3 -> 12 LLM sequences per micro-batch
    "7b": dict(train_batch=4, steps=20, warmup=3, baseline_steps=8, accum=4, pope_images=32, pope_per_image=6,
               pope_batch=64, pope_baseline_items=24, chair_images=64, chair_tokens=256, chair_batch=64,
               chair_baseline_items=2, loader_images=64, loader_batch=8, repeats=1, profile_steps=3, vcd_items=64,
               vcd_baseline_items=8, opera_items=32, opera_baseline_items=2, opera_tokens=128),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--out", required=True, help="JSON results; the Markdown table and profile go next to it")
    ap.add_argument("--quick", action="store_true", help="smallest settings (smoke test; timings meaningless)")
    ap.add_argument("--low-resource", action="store_true",
                    help="7B only: peak memory of training with the 8-bit LLM (needs bitsandbytes)")
    ap.add_argument("--encoder-device", choices=("cpu",), default=None, help="with --low-resource: ViT on the CPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="accelerator bf16 peak, for MFU")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default on CPU: 1; the tiny model's ops are too small to split, "
                         "and on a shared machine 2 OpenMP threads wait on each other: 0.8 s instead of 0.05 s "
                         "per batch-1 answer measured under load 7 on 2 cores)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=("train", "loader", "pope", "vcd", "opera", "chair", "profile"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else threads))
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


class Bench:
    """What the steps of one benchmark run share: the settings, the model, the report and what is extrapolated.
    (A plain class: the smoke test loads this script without registering it as a module, which dataclasses need.)"""

    def __init__(self, args: argparse.Namespace, device: torch.device, preset: dict[str, int], workdir: Path,
                 out: Path, tokenizer_dir: str, meta: dict[str, Any], began: float):
        self.args, self.device, self.preset, self.workdir, self.out = args, device, preset, workdir, out
        self.tokenizer_dir, self.began, self.results = tokenizer_dir, began, {"meta": meta}
        self.model: Any = None
        self.report: Report | None = None
        self.extrapolated: dict[str, Any] = {}
        self.eval_paths: list[str] = []

    @property
    def meta(self) -> dict[str, Any]:
        return self.results["meta"]

    @property
    def image_size(self) -> int:
        return self.model.encoder.vision_config.image_size

    def say(self, what: str) -> None:
        print(f"{what} ({time.perf_counter() - self.began:.0f} s)", flush=True)


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
    bench.eval_paths = write_images(bench.workdir / "val2014",
                                    max(bench.preset["pope_images"], bench.preset["chair_images"]), seed=1)
    if "pope" not in args.skip:
        pope_rows(bench)
    if "vcd" not in args.skip:
        vcd_rows(bench)
    if "opera" not in args.skip:
        opera_rows(bench)
    if "chair" not in args.skip:
        chair_rows(bench)
    bench.results["extrapolated"] = bench.extrapolated
    bench.meta["benchmark_s"] = time.perf_counter() - bench.began
    return finish(bench.results, bench.out, bench.report)


def start(args: argparse.Namespace) -> Bench:
    """Check the arguments, make the scratch folder and the offline tokenizer, and record the machine."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.size == "7b" and device.type != "cuda":
        raise SystemExit("--size 7b runs on a GPU (random 7B weights in bf16); use --device cuda")
    if args.low_resource and args.size != "7b":
        raise SystemExit("--low-resource measures the 7B model; add --size 7b")
    preset = PRESETS["quick" if args.quick else args.size]
    quiet_progress_bars()
    began = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="minigpt4-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    import transformers

    from minigpt4.common.tiny_models import train_tokenizer

    tokenizer_dir = str(workdir / "tokenizer")
    train_tokenizer(tokenizer_dir)
    meta = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "size": args.size, "quick": args.quick,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "gpu_measured": device.type == "cuda", "weights": "random (nothing downloaded)",
        "mfu_formula": "MFU = 4·N·(LLM tokens/s) / peak bf16 FLOP/s; N = LLM parameters without the input "
                       "embedding; 4·N = forward 2·N + backward 2·N (activation gradients only: frozen LLM)",
        "greedy_margin": "LM head scaled ×20 so batched and batch-1 greedy answers are comparable",
        "preset": preset, "transformers": transformers.__version__,
    }
    return Bench(args, device, preset, workdir, out, tokenizer_dir, meta, began)


def training_rows(bench: Bench) -> None:
    """Encoder once vs S times, trimmed vs fixed padding, sdpa vs eager, bf16 vs fp32 (GPU); the profile."""
    bench.say("training rows")
    model, device, preset, report = bench.model, bench.device, bench.preset, bench.report
    amp = device.type == "cuda"
    batches = training_batches(model, 4, preset["train_batch"], bench.image_size, device)
    pad_to = model.build_training_text([None], [""]).input_ids.shape[1] + model.max_txt_len
    check_reference(model, batches, device, pad_to)
    common = dict(warmup=preset["warmup"], accum=preset["accum"], device=device, amp=amp)
    s = model.vib.num_samples

    def train_run(loss_fn, steps, attention="sdpa"):
        def run_once():
            model.llm.set_attn_implementation(attention)
            try:
                return None, time_training(model, batches, loss_fn, steps=steps, **common)
            except torch.cuda.OutOfMemoryError:  # a baseline too big for the card is a result, not a crash
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return None, {"error": "CUDA out of memory", "samples_per_s": 0.0, "tokens_per_s": 0.0}
            finally:
                model.llm.set_attn_implementation("sdpa")
        return run_once

    timed = interleaved({
        "once": train_run(model_loss, preset["steps"]),
        "s_times": train_run(lambda m, b: reference_forward(m, b, encoder_passes=s), preset["baseline_steps"]),
        "fixed": train_run(lambda m, b: reference_forward(m, b, pad_to=pad_to), preset["baseline_steps"]),
        "eager": train_run(model_loss, preset["baseline_steps"], attention="eager"),
    }, preset["repeats"], "samples_per_s")
    once, s_times, fixed, eager = (timed[k][1] for k in ("once", "s_times", "fixed", "eager"))
    report.add("train: encoder passes per image (S-sample VIB)", "samples/s", once, s_times, "samples_per_s",
               optimized_label="once", baseline_label=f"{s}× (per sample)")
    report.add("train: padding", "tokens/s", once, fixed, "tokens_per_s", optimized_label="trimmed per batch",
               baseline_label=f"fixed {pad_to}")
    report.add("train: LLM attention", "samples/s", once, eager, "samples_per_s", optimized_label="sdpa",
               baseline_label="eager")
    precision_row(bench, batches, once, common)
    flops = 4 * bench.meta["llm_matmul_params"] * once["tokens_per_s"]
    peak = peak_tflops(bench.meta["device_name"], bench.args.peak_tflops) if device.type == "cuda" else None
    bench.extrapolated.update(
        train_tflops_4N=flops / 1e12, mfu=(flops / (peak * 1e12)) if peak else None, peak_bf16_tflops=peak,
        epoch_5000_pairs_s=5000 / once["samples_per_s"], train_peak_gb=once["peak_mb"] / 1024,
        train_config=f"micro-batch {preset['train_batch']} × accumulation {preset['accum']}, S={s}; "
                     f"{preset['steps']} micro-batches timed, epoch = 5000 / samples per s")
    if "profile" not in bench.args.skip:
        bench.results["profile_top_ops"] = profile_training(model, batches, preset["profile_steps"], device, amp,
                                                            bench.out.with_name(bench.out.stem + "_profile.txt"))


def precision_row(bench: Bench, batches: list[dict], once: dict, common: dict) -> None:
    """bf16 autocast against fp32 weights on a GPU; on the CPU (fp32 only) the row is recorded as not measured."""
    model, report = bench.model, bench.report
    if bench.device.type != "cuda":
        report.add("train: precision", "samples/s", once, None, "samples_per_s", optimized_label="fp32",
                   baseline_label="bf16 autocast", note="GPU only: the CPU runs fp32")
        return
    llm_dtype, encoder_dtype = model.llm.dtype, next(model.encoder.parameters()).dtype
    model.float()  # bf16 -> fp32 -> bf16 is exact: the model is unchanged afterwards
    fp32 = time_training(model, batches, model_loss, steps=max(2, bench.preset["baseline_steps"] // 2),
                         **{**common, "amp": False})
    model.llm.to(llm_dtype)
    model.encoder.to(encoder_dtype)  # the projector stays fp32 (master weights)
    torch.cuda.empty_cache()
    report.add("train: precision", "samples/s", once, fp32, "samples_per_s", optimized_label="bf16 autocast",
               baseline_label="fp32")


def loader_row(bench: Bench) -> None:
    bench.say("data loader row")
    preset, device = bench.preset, bench.device
    paths = write_images(bench.workdir / "train_images", preset["loader_images"])
    workers = min(4, os.cpu_count() or 1)
    kwargs = dict(image_size=bench.image_size, batch_size=preset["loader_batch"])
    parallel = loader_throughput(bench.workdir, paths, workers=workers, pin_memory=device.type == "cuda", **kwargs)
    inline = loader_throughput(bench.workdir, paths, workers=0, pin_memory=False, **kwargs)
    bench.report.add("data: training images decoded + augmented", "samples/s", parallel, inline, "samples_per_s",
                     optimized_label=f"{workers} workers" + (" + pinned" if device.type == "cuda" else ""),
                     baseline_label="in-process")


def pope_rows(bench: Bench) -> None:
    """Batching, length sort, feature cache (first and later evaluation) and KV cache, answers compared."""
    bench.say("POPE rows")
    model, preset, workdir, report = bench.model, bench.preset, bench.workdir, bench.report
    items = pope_items(bench.eval_paths[:preset["pope_images"]], preset["pope_per_image"])
    pope = dict(max_new_tokens=10, image_size=bench.image_size)
    batch, reps = preset["pope_batch"], preset["repeats"]
    time_generation(model, items[:batch], workdir, "pope_warmup", batch_size=batch, **pope)  # one-time costs
    subset = items[:preset["pope_baseline_items"]]
    cache = str(workdir / "feature_cache")
    # The first evaluation with an empty cache (encodes each image once) can only run once.
    cold, t_cold = time_generation(model, items, workdir, "pope_cache_cold", batch_size=batch,
                                   feature_cache=cache, **pope)

    def variant(name, these=items, **kwargs):
        return lambda: time_generation(model, these, workdir, name, **{"batch_size": batch, **pope, **kwargs})

    timed = interleaved({
        "batched": variant("pope_batched"),
        "batch1": variant("pope_b1", subset, batch_size=1),
        "unsorted": variant("pope_unsorted", sort=False),
        "cache_warm": variant("pope_cache_warm", feature_cache=cache),
        "no_kv": variant("pope_no_kv", use_cache=False),
    }, reps, "items_per_s")
    (batched, t_batched), (one, t_one) = timed["batched"], timed["batch1"]
    report.add("POPE: batching", "questions/s", t_batched, t_one, "items_per_s",
               optimized_label=f"batch {batch}, sorted", baseline_label="batch 1", answers=(batched, one))
    report.add("POPE: prompt-length sort", "questions/s", t_batched, timed["unsorted"][1], "items_per_s",
               optimized_label="sorted", baseline_label="unsorted", answers=(batched, timed["unsorted"][0]))
    report.add("POPE: feature cache, first evaluation", "questions/s", t_cold, t_batched, "items_per_s",
               optimized_label="cache (each image encoded once)", baseline_label="no cache",
               answers=(cold, batched), note=f"{preset['pope_per_image']} questions per image")
    report.add("POPE: feature cache, later evaluations", "questions/s", timed["cache_warm"][1], t_batched,
               "items_per_s", optimized_label="cache hit", baseline_label="no cache",
               answers=(timed["cache_warm"][0], batched))
    report.add("POPE: KV cache", "questions/s", t_batched, timed["no_kv"][1], "items_per_s",
               optimized_label="KV cache", baseline_label="recompute", answers=(batched, timed["no_kv"][0]))
    bench.extrapolated.update(pope_8910_s=8910 / t_cold["items_per_s"], pope_8910_s_no_feature_cache=8910 /
                              t_batched["items_per_s"], pope_8910_s_batch1=8910 / t_one["items_per_s"])


def vcd_rows(bench: Bench) -> None:
    """VCD (eval.decoding = vcd, the source's POPE defaults) against greedy decoding on the same POPE questions in the
    same run: throughput batched and latency at batch 1 (minigpt4/benchmarking/decoding_costs.py)."""
    from minigpt4.eval.decodings import decoding_label, resolve_decoding
    from minigpt4.eval.settings import EvalSettings

    bench.say("VCD rows")
    preset, batch = bench.preset, bench.preset["pope_batch"]
    items = pope_items(bench.eval_paths[:preset["pope_images"]], preset["pope_per_image"])[:preset["vcd_items"]]
    vcd = resolve_decoding(EvalSettings(decoding="vcd"), "pope")  # eval.vcd's defaults: the source's POPE values
    timer = generation_timer(bench.model, bench.workdir, image_size=bench.image_size, max_new_tokens=10)
    timer("vcd_warmup", items[:batch], batch, vcd, {})
    bench.results["vcd"] = costs = decoding_cost_rows(
        bench.report, timer, name="VCD", label=decoding_label(vcd), decoding=vcd, kwargs={}, baselines={"greedy": {}},
        items=items, subset=items[:preset["vcd_baseline_items"]], batch=batch, repeats=preset["repeats"],
        metric="questions/s")
    bench.extrapolated.update(vcd_throughput_cost_x=costs["throughput_cost_x"],
                              vcd_latency_cost_x=costs["latency_cost_x"])


def opera_rows(bench: Bench) -> None:
    """OPERA (eval.decoding = opera, the source's defaults) against greedy decoding and plain beam search with the
    same beams, on the same CHAIR captions in the same run, every variant generated to EOS or the token limit as
    OPERA is (the published figure: about 7× greedy's latency, LLaVA-1.5 on a GPU)."""
    from minigpt4.eval.decodings import decoding_label, resolve_decoding
    from minigpt4.eval.settings import EvalSettings

    bench.say("OPERA rows")
    preset, batch = bench.preset, bench.preset["chair_batch"]
    items = chair_items(bench.eval_paths[:preset["opera_items"]])
    opera = resolve_decoding(EvalSettings(decoding="opera"), "chair")
    timer = generation_timer(bench.model, bench.workdir, image_size=bench.image_size, sort=False,
                             max_new_tokens=preset["opera_tokens"])
    beams = {"num_beams": opera.num_beams, "stop_strings": []}
    timer("opera_warmup", items[:batch], batch, opera, beams)
    bench.results["opera"] = costs = decoding_cost_rows(
        bench.report, timer, name="OPERA", label=decoding_label(opera), decoding=opera, kwargs=beams,
        baselines={"greedy": {"stop_strings": []}, f"beam search ({opera.num_beams} beams)": beams}, items=items,
        subset=items[:preset["opera_baseline_items"]], batch=batch, repeats=preset["repeats"], metric="captions/s")
    greedy, beam_search = costs["cost_x_by_baseline"].values()
    bench.extrapolated.update(opera_cost_x_vs_greedy=greedy, opera_cost_x_vs_beam_search=beam_search)


def chair_rows(bench: Bench) -> None:
    bench.say("CHAIR rows")
    model, preset, workdir = bench.model, bench.preset, bench.workdir
    items = chair_items(bench.eval_paths[:preset["chair_images"]])
    chair = dict(max_new_tokens=preset["chair_tokens"], sort=False, image_size=bench.image_size)
    chair_b1_repeats = 1 if bench.args.size == "7b" else preset["repeats"]  # 7B: 256 tokens one by one, once
    timed = interleaved({
        "batched": lambda: time_generation(model, items, workdir, "chair_batched",
                                           batch_size=preset["chair_batch"], **chair)}, preset["repeats"],
        "items_per_s")
    timed.update(interleaved({
        "batch1": lambda: time_generation(model, items[:preset["chair_baseline_items"]], workdir, "chair_b1",
                                          batch_size=1, **chair)}, chair_b1_repeats, "items_per_s"))
    (batched, t_batched), (one, t_one) = timed["batched"], timed["batch1"]
    bench.report.add(f"CHAIR: batching ({preset['chair_tokens']} new tokens)", "captions/s", t_batched, t_one,
                     "items_per_s", optimized_label=f"batch {preset['chair_batch']}", baseline_label="batch 1",
                     answers=(batched, one))
    bench.extrapolated.update(chair_500_s=500 / t_batched["items_per_s"], chair_tokens=preset["chair_tokens"])


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
    return {**timing, "peak_gb": peak_gb, "encoder_device": args.encoder_device or "cuda",
            "random_llm_written_s": saved_s, "target_gb": GPU_TARGETS["low_resource_peak_gb_max"],
            "meets_target": peak_gb <= GPU_TARGETS["low_resource_peak_gb_max"]}


def targets(results: dict[str, Any], report: Report) -> dict[str, Any]:
    rows = {r["name"].split(" (")[0]: r for r in report.rows}
    meta, ext, checks = results["meta"], results.get("extrapolated", {}), {}
    if meta["device"] == "cpu" and not meta["quick"]:
        if "POPE: batching" in rows:
            r = rows["POPE: batching"]
            checks["cpu: batched POPE >= 3x batch 1, identical answers"] = (r["speedup"] or 0) >= 3 and bool(
                r["identical"])
        if "train: encoder passes per image" in rows:
            checks["cpu: encoder once faster than S times"] = (rows["train: encoder passes per image"]["speedup"]
                                                               or 0) > 1
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
    results["rows"] = report.rows
    results["meta"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results, report)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    meta = results["meta"]
    lines = [f"Benchmark on {meta['device_name']} ({meta['device']}, {meta['cpu_cores']} CPU cores, load average "
             f"{meta['load_average_before']} before / {meta['load_average_after']} after), size {meta['size']}",
             "", report.table(), ""]
    for key, value in results.get("extrapolated", {}).items():
        lines.append(f"- {key}: {format_value(value) if isinstance(value, (int, float)) else value}")
    for key, value in results["targets"].items():
        lines.append(f"- target {key}: {'pass' if value else ('not measured' if value is None else 'FAIL')}")
    if "low_resource" in results:
        lines.append(f"- low_resource: {json.dumps(results['low_resource'], default=str)}")
    lines.append(f"- {meta['mfu_formula']}")
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return results


if __name__ == "__main__":
    main()
