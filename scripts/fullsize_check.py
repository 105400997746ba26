#!/usr/bin/env python
"""Full-size check: the real MiniGPT-4 7B (or LLaVA-1.5-7B) with random weights, measured against this machine.

    python scripts/fullsize_check.py --out out/fullsize/cpu_7b.json                    # 7B bf16 on the CPU
    python scripts/fullsize_check.py --device cuda --out out/fullsize/gpu_7b.json      # called by gpu_check.sh
    python scripts/fullsize_check.py --size tiny --out /tmp/fullsize_tiny.json         # seconds (the CI test)

The model is built by the project's builder with random weights, straight in its dtype (model.precision, bf16 by
default) on its device: one copy, never an fp32 model cast afterwards. Then, each timed and under torch.profiler:
  train   one AdaVIB micro-step: S = 3 noise samples, batch 1, a 100-token caption, backward to the projector,
          AdamW step (the Runner's autocast and optimizer);
  pope    one POPE batch through the evaluation path: 2 questions, 10 new tokens;
  chair   one CHAIR caption: 32 new tokens (generation is forced to exactly that many: no stop strings, EOS
          held back until then).
It prints, before building anything, one line saying whether the device has the memory the memory model asks for
(and stops with exit 2 if not, unless --force). The matmul rate (torch.matmul of large matrices in the same dtype,
same threads) and the copy bandwidth are measured before and after the workload; the report holds model FLOP/s
against the first and decode steps (bytes read per step) against the second, peak memory against the memory model
(weights + activations + optimizer + runtime), and each phase's most expensive ops. Output: OUT (JSON), OUT with
.md (the table), OUT_<phase>_profile.txt. Nothing is downloaded; the tokenizer is trained offline in a second.

7B bf16 on the CPU needs about 19 GB and about 5 minutes on 2 cores; do not run it beside the test suite on a
24 GB machine (check `free -g` first). Formulas: minigpt4/benchmarking/costs.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from minigpt4.benchmarking.fullsize import ARCHES, SIZES, CheckSettings  # noqa: E402
from minigpt4.benchmarking.fullsize_run import NotEnoughMemory, run_check  # noqa: E402
from minigpt4.common.results_header import publish, publish_path  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHES, default="minigpt4")
    ap.add_argument("--size", choices=SIZES, default="7b",
                    help="7b: the real sizes; small: real widths, 2 layers (~0.6 GB); tiny: the test model")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="model.precision")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--out", required=True, help="JSON report; the table and profiles are written beside it")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--no-profile", action="store_true", help="skip torch.profiler")
    ap.add_argument("--force", action="store_true", help="run even when the memory model says it does not fit")
    ap.add_argument("--publish", type=publish_path, metavar="PATH.md",
                    help="also copy the Markdown table there when done, e.g. docs/results/fullsize_cpu_7b.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no GPU")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = CheckSettings(arch=args.arch, size=args.size, device=args.device, precision=args.precision,
                             profile=not args.no_profile)
    try:
        results = run_check(settings, Path(args.out), workdir=args.workdir and Path(args.workdir), force=args.force)
    except NotEnoughMemory as err:
        print(f"error: {err}; not started (--force runs it anyway)", file=sys.stderr)
        raise SystemExit(2) from None
    if args.publish:
        print(f"published {publish(Path(args.out).with_suffix('.md'), args.publish)}")
    return results


if __name__ == "__main__":
    main()
