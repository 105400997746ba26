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

The rows, the model and the report are minigpt4/benchmarking/speed_{setup,rows,run}.py.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from minigpt4.benchmarking.speed_run import run  # noqa: E402
from minigpt4.common.results_header import publish, publish_path  # noqa: E402


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
    ap.add_argument("--publish", type=publish_path, metavar="PATH.md",
                    help="also copy the Markdown table there when done, e.g. docs/results/benchmark_cpu_tiny.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else threads))
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)
    if args.publish:
        print(f"published {publish(Path(args.out).with_suffix('.md'), args.publish)}")
    return results


if __name__ == "__main__":
    main()
