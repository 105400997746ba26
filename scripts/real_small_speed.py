#!/usr/bin/env python
"""The real-small fine-tune step on a CPU: model FLOP/s against this machine's matmul rate, measured in one run.

    python scripts/real_small_speed.py --out out/real_small/speed.json            # AdaVIB recipe, bf16 autocast
    python scripts/real_small_speed.py --out ... --amp none --options model.mm_projector_type=linear

One optimizer step of the recipe (train_configs/real_small_adavib.yaml unless --cfg-path) on real shapes-world
batches (its datasets.shapes_qa world): the encoder once per image, the projector's S noise samples, the LLM
forward and backward under bf16 autocast. The step's FLOPs are counted by torch.utils.flop_counter on a real step
(every matmul and convolution it runs, backward included), so nothing is estimated. The machine's rate is
torch.matmul on bf16 1024 × 1024 (minigpt4/benchmarking/hardware.py), before and after the steps; the step's rate
is held against the better of the two. Also: peak memory (VmHWM, minigpt4/benchmarking/measure.py), the profile's
top operations (torch.profiler, self CPU time), and the load average (a shared machine slows everything).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", default="train_configs/real_small_adavib.yaml")
    ap.add_argument("--options", nargs="*", default=[], help="model.* overrides")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--amp", choices=("bf16", "none"), default="bf16")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def build(args):
    import torch

    from minigpt4.common.config import ModelConfig, load_yaml, merge, parse_options, validate_model_config
    from minigpt4.models.from_config import build_model
    from minigpt4.shapes.world.qa import ShapesQADataset, collate

    recipe = load_yaml(args.cfg_path)
    cfg = merge(ModelConfig, recipe.model, parse_options(args.options).get("model", {}), where="model")
    validate_model_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    world = recipe.datasets.shapes_qa
    data = ShapesQADataset(world.root, "train", image_size=world.image_size, question_fraction=0.4)
    batches = [collate([data[i] for i in range(start, start + args.batch_size)])
               for start in range(0, args.batch_size * (args.steps + 1), args.batch_size)]
    return model, batches


def one_step(model, optimizer, batch, amp: bool) -> None:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def top_ops(model, optimizer, batch, amp: bool, limit: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(model, optimizer, batch, amp)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in top]


def measure(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from minigpt4.benchmarking.hardware import matmul_rate
    from minigpt4.benchmarking.measure import PeakMemory

    model, batches = build(args)
    amp = args.amp == "bf16"
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    rate_before = matmul_rate(device, torch.bfloat16 if amp else torch.float32, 1024)
    with FlopCounterMode(display=False) as counter:
        one_step(model, optimizer, batches[0], amp)  # also the warm-up step
    flops = counter.get_total_flops()
    seconds = []
    with PeakMemory(device) as peak:
        for batch in batches[1:]:
            start = time.perf_counter()
            one_step(model, optimizer, batch, amp)
            seconds.append(time.perf_counter() - start)
    rate_after = matmul_rate(device, torch.bfloat16 if amp else torch.float32, 1024)
    step_s = statistics.median(seconds)
    machine = max(rate_before["tflops_best"], rate_after["tflops_best"])
    return {"recipe": args.cfg_path, "options": args.options, "amp": args.amp, "batch_size": args.batch_size,
            "samples": model.vib.num_samples if model.vib is not None else 1, "step_flops": flops,
            "step_s": seconds, "step_s_median": step_s, "model_tflops": flops / step_s / 1e12,
            "matmul_tflops_before": rate_before, "matmul_tflops_after": rate_after,
            "share_of_matmul_rate": flops / step_s / 1e12 / machine, **peak.result(),
            "top_ops": top_ops(model, optimizer, batches[1], amp), "load_average": os.getloadavg(),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from minigpt4.common.errors import USER_FACING_ERRORS
    from minigpt4.common.jsonfiles import write_json

    try:
        result = measure(args)
    except (ValueError, *USER_FACING_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(f"step {result['step_s_median']:.2f} s, {result['step_flops'] / 1e12:.3f} TFLOP -> "
          f"{result['model_tflops']:.3f} TFLOP/s = {result['share_of_matmul_rate']:.0%} of matmul "
          f"({result['matmul_tflops_before']['tflops_best']:.3f} / "
          f"{result['matmul_tflops_after']['tflops_best']:.3f}); "
          f"peak {result['peak_mb']:.0f} MB; load {result['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
