"""The rows of the speed benchmark (scripts/benchmark.py): each optimization against the straightforward path it
replaces, on the same inputs in one run, interleaved (measure.interleaved), outputs that must be identical
compared (measure.Report)."""
from __future__ import annotations

import os

import torch

from minigpt4.benchmarking.decoding_costs import decoding_cost_rows, generation_timer
from minigpt4.benchmarking.measure import interleaved, peak_tflops
from minigpt4.benchmarking.speed_setup import Bench
from minigpt4.benchmarking.workloads import (
    chair_items,
    check_reference,
    loader_throughput,
    model_loss,
    pope_items,
    profile_training,
    reference_forward,
    time_generation,
    time_training,
    training_batches,
    write_images,
)


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

    def s_times_loss(m, b):
        return reference_forward(m, b, encoder_passes=s)

    def fixed_padding_loss(m, b):
        return reference_forward(m, b, pad_to=pad_to)

    baseline_steps = preset["baseline_steps"]
    timed = interleaved({
        "once": train_run(model_loss, preset["steps"]),
        "s_times": train_run(s_times_loss, baseline_steps),
        "fixed": train_run(fixed_padding_loss, baseline_steps),
        "eager": train_run(model_loss, baseline_steps, attention="eager"),
    }, preset["repeats"], "samples_per_s")
    once, s_times, fixed, eager = (timed[k][1] for k in ("once", "s_times", "fixed", "eager"))
    report.add("train: encoder passes per image (S-sample VIB)", "samples/s", once, s_times, "samples_per_s",
               optimized_label="once", baseline_label=f"{s}× (per sample)")
    report.add("train: padding", "tokens/s", once, fixed, "tokens_per_s",
               optimized_label="trimmed per batch", baseline_label=f"fixed {pad_to}")
    report.add("train: LLM attention", "samples/s", once, eager, "samples_per_s",
               optimized_label="sdpa", baseline_label="eager")
    precision_row(bench, batches, once, common)
    training_extrapolation(bench, once)
    if "profile" not in bench.args.skip:
        profile_path = bench.out.with_name(bench.out.stem + "_profile.txt")
        bench.results["profile_top_ops"] = profile_training(model, batches, preset["profile_steps"], device, amp,
                                                            profile_path)


def training_extrapolation(bench: Bench, once: dict) -> None:
    """From the optimized training row: FLOP/s by the 4·N formula, MFU (GPU), an epoch of 5,000 pairs, the peak."""
    preset, s = bench.preset, bench.model.vib.num_samples
    flops = 4 * bench.meta["llm_matmul_params"] * once["tokens_per_s"]
    peak = None
    if bench.device.type == "cuda":
        peak = peak_tflops(bench.meta["device_name"], bench.args.peak_tflops)
    bench.extrapolated.update(
        train_tflops_4N=flops / 1e12,
        mfu=(flops / (peak * 1e12)) if peak else None,
        peak_bf16_tflops=peak,
        epoch_5000_pairs_s=5000 / once["samples_per_s"],
        train_peak_gb=once["peak_mb"] / 1024,
        train_config=f"micro-batch {preset['train_batch']} × accumulation {preset['accum']}, S={s}; "
                     f"{preset['steps']} micro-batches timed, epoch = 5000 / samples per s",
    )


def precision_row(bench: Bench, batches: list[dict], once: dict, common: dict) -> None:
    """bf16 autocast against fp32 weights on a GPU; on the CPU (fp32 only) the row is recorded as not measured."""
    model, report = bench.model, bench.report
    if bench.device.type != "cuda":
        report.add("train: precision", "samples/s", once, None, "samples_per_s", optimized_label="fp32",
                   baseline_label="bf16 autocast", note="GPU only: the CPU runs fp32")
        return
    llm_dtype, encoder_dtype = model.llm.dtype, next(model.encoder.parameters()).dtype
    model.float()  # bf16 -> fp32 -> bf16 is exact: the model is unchanged afterwards
    steps = max(2, bench.preset["baseline_steps"] // 2)
    fp32 = time_training(model, batches, model_loss, steps=steps, **{**common, "amp": False})
    model.llm.to(llm_dtype)
    model.encoder.to(encoder_dtype)  # the projector stays fp32 (master weights)
    torch.cuda.empty_cache()
    report.add("train: precision", "samples/s", once, fp32, "samples_per_s",
               optimized_label="bf16 autocast", baseline_label="fp32")


def loader_row(bench: Bench) -> None:
    bench.say("data loader row")
    preset, device = bench.preset, bench.device
    paths = write_images(bench.workdir / "train_images", preset["loader_images"])
    workers = min(4, os.cpu_count() or 1)
    pinned = device.type == "cuda"
    kwargs = dict(image_size=bench.image_size, batch_size=preset["loader_batch"])
    parallel = loader_throughput(bench.workdir, paths, workers=workers, pin_memory=pinned, **kwargs)
    inline = loader_throughput(bench.workdir, paths, workers=0, pin_memory=False, **kwargs)
    bench.report.add("data: training images decoded + augmented", "samples/s", parallel, inline, "samples_per_s",
                     optimized_label=f"{workers} workers" + (" + pinned" if pinned else ""),
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
        options = {"batch_size": batch, **pope, **kwargs}
        return lambda: time_generation(model, these, workdir, name, **options)

    timed = interleaved({
        "batched": variant("pope_batched"),
        "batch1": variant("pope_b1", subset, batch_size=1),
        "unsorted": variant("pope_unsorted", sort=False),
        "cache_warm": variant("pope_cache_warm", feature_cache=cache),
        "no_kv": variant("pope_no_kv", use_cache=False),
    }, reps, "items_per_s")
    (batched, t_batched), (one, t_one) = timed["batched"], timed["batch1"]
    (unsorted, t_unsorted), (warm, t_warm), (no_kv, t_no_kv) = (timed[k] for k in ("unsorted", "cache_warm", "no_kv"))
    report.add("POPE: batching", "questions/s", t_batched, t_one, "items_per_s",
               optimized_label=f"batch {batch}, sorted", baseline_label="batch 1", answers=(batched, one))
    report.add("POPE: prompt-length sort", "questions/s", t_batched, t_unsorted, "items_per_s",
               optimized_label="sorted", baseline_label="unsorted", answers=(batched, unsorted))
    report.add("POPE: feature cache, first evaluation", "questions/s", t_cold, t_batched, "items_per_s",
               optimized_label="cache (each image encoded once)", baseline_label="no cache",
               answers=(cold, batched), note=f"{preset['pope_per_image']} questions per image")
    report.add("POPE: feature cache, later evaluations", "questions/s", t_warm, t_batched, "items_per_s",
               optimized_label="cache hit", baseline_label="no cache", answers=(warm, batched))
    report.add("POPE: KV cache", "questions/s", t_batched, t_no_kv, "items_per_s",
               optimized_label="KV cache", baseline_label="recompute", answers=(batched, no_kv))
    bench.extrapolated.update(
        pope_8910_s=8910 / t_cold["items_per_s"],
        pope_8910_s_no_feature_cache=8910 / t_batched["items_per_s"],
        pope_8910_s_batch1=8910 / t_one["items_per_s"],
    )


def vcd_rows(bench: Bench) -> None:
    """VCD (eval.decoding = vcd, the source's POPE defaults) against greedy decoding on the same POPE questions in
    the same run: throughput batched and latency at batch 1 (minigpt4/benchmarking/decoding_costs.py)."""
    from minigpt4.eval.decodings import decoding_label, resolve_decoding
    from minigpt4.eval.settings import EvalSettings

    bench.say("VCD rows")
    preset, batch = bench.preset, bench.preset["pope_batch"]
    items = pope_items(bench.eval_paths[:preset["pope_images"]], preset["pope_per_image"])
    items = items[:preset["vcd_items"]]
    vcd = resolve_decoding(EvalSettings(decoding="vcd"), "pope")  # eval.vcd's defaults: the source's POPE values
    timer = generation_timer(bench.model, bench.workdir, image_size=bench.image_size, max_new_tokens=10)
    timer("vcd_warmup", items[:batch], batch, vcd, {})
    bench.results["vcd"] = costs = decoding_cost_rows(
        bench.report, timer, name="VCD", label=decoding_label(vcd), decoding=vcd, kwargs={},
        baselines={"greedy": {}}, items=items, subset=items[:preset["vcd_baseline_items"]], batch=batch,
        repeats=preset["repeats"], metric="questions/s")
    bench.extrapolated.update(vcd_throughput_cost_x=costs["throughput_cost_x"],
                              vcd_latency_cost_x=costs["latency_cost_x"])


def opera_rows(bench: Bench) -> None:
    """OPERA (eval.decoding = opera, the source's defaults) against greedy decoding and plain beam search with
    the same beams, on the same CHAIR captions in the same run, every variant generated to EOS or the token limit
    as OPERA is (the published figure: about 7× greedy's latency, LLaVA-1.5 on a GPU)."""
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
    baselines = {"greedy": {"stop_strings": []}, f"beam search ({opera.num_beams} beams)": beams}
    bench.results["opera"] = costs = decoding_cost_rows(
        bench.report, timer, name="OPERA", label=decoding_label(opera), decoding=opera, kwargs=beams,
        baselines=baselines, items=items, subset=items[:preset["opera_baseline_items"]], batch=batch,
        repeats=preset["repeats"], metric="captions/s")
    greedy, beam_search = costs["cost_x_by_baseline"].values()
    bench.extrapolated.update(opera_cost_x_vs_greedy=greedy, opera_cost_x_vs_beam_search=beam_search)


def chair_rows(bench: Bench) -> None:
    bench.say("CHAIR rows")
    model, preset, workdir = bench.model, bench.preset, bench.workdir
    items = chair_items(bench.eval_paths[:preset["chair_images"]])
    chair = dict(max_new_tokens=preset["chair_tokens"], sort=False, image_size=bench.image_size)
    chair_b1_repeats = 1 if bench.args.size == "7b" else preset["repeats"]  # 7B: 256 tokens one by one, once

    def batched_run():
        return time_generation(model, items, workdir, "chair_batched", batch_size=preset["chair_batch"], **chair)

    def batch1_run():
        subset = items[:preset["chair_baseline_items"]]
        return time_generation(model, subset, workdir, "chair_b1", batch_size=1, **chair)

    timed = interleaved({"batched": batched_run}, preset["repeats"], "items_per_s")
    timed.update(interleaved({"batch1": batch1_run}, chair_b1_repeats, "items_per_s"))
    (batched, t_batched), (one, t_one) = timed["batched"], timed["batch1"]
    bench.report.add(f"CHAIR: batching ({preset['chair_tokens']} new tokens)", "captions/s", t_batched, t_one,
                     "items_per_s", optimized_label=f"batch {preset['chair_batch']}", baseline_label="batch 1",
                     answers=(batched, one))
    bench.extrapolated.update(chair_500_s=500 / t_batched["items_per_s"], chair_tokens=preset["chair_tokens"])
