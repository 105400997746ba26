"""What every row of the speed benchmark (scripts/benchmark.py) starts from: the presets, the model with random
weights, and the run's shared state (Bench) with its record of the machine."""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minigpt4.benchmarking.measure import Report
from minigpt4.benchmarking.workloads import quiet_progress_bars

GPU_TARGETS = {
    "epoch_s_max": 180.0,
    "mfu_min": 0.40,
    "pope_8910_s_max": 60.0,
    "chair_500x256_s_max": 60.0,
    "train_peak_gb_max": 40.0,
    "low_resource_peak_gb_max": 24.0,
}
# The run's sizes per preset: quick = the smoke test, every row at the smallest sizes (seconds on 2 cores; timings
# meaningless); tiny = the CPU benchmark; 7b = micro-batch 4 × accumulation 4 = effective batch 16, with S = 3 that
# is 12 LLM sequences per micro-batch.
PRESET_NAMES = ("quick", "tiny", "7b")
PRESET_TABLE: dict[str, tuple[int, int, int]] = {
    # setting: (quick, tiny, 7b)
    "train_batch": (2, 4, 4),
    "steps": (2, 30, 20),
    "warmup": (1, 3, 3),
    "baseline_steps": (2, 30, 8),
    "accum": (1, 1, 4),
    "pope_images": (2, 16, 32),
    "pope_per_image": (3, 6, 6),
    "pope_batch": (8, 32, 64),
    "pope_baseline_items": (6, 96, 24),
    "chair_images": (2, 16, 64),
    "chair_tokens": (4, 32, 256),
    "chair_batch": (2, 16, 64),
    "chair_baseline_items": (2, 16, 2),
    "loader_images": (8, 96, 64),
    "loader_batch": (4, 8, 8),
    "repeats": (1, 5, 1),
    "profile_steps": (1, 3, 3),
    "vcd_items": (6, 96, 64),
    "vcd_baseline_items": (3, 24, 8),
    "opera_items": (2, 16, 32),
    "opera_baseline_items": (1, 4, 2),
    "opera_tokens": (12, 32, 128),
}
PRESETS: dict[str, dict[str, int]] = {
    name: {setting: values[column] for setting, values in PRESET_TABLE.items()}
    for column, name in enumerate(PRESET_NAMES)
}
MFU_FORMULA = ("MFU = 4·N·(LLM tokens/s) / peak bf16 FLOP/s; N = LLM parameters without the input "
               "embedding; 4·N = forward 2·N + backward 2·N (activation gradients only: frozen LLM)")


def build(size: str, device: torch.device, tokenizer_dir: str, *, llm_path: str | None = None,
          low_resource: bool = False, encoder_device: str | None = None):
    """The model with random weights: the tiny one, or MiniGPT-4 7B's shapes (EVA ViT-g with 39 blocks, a
    BERT-base Q-Former, 32 queries, Vicuna-7B; S = 3). Its LM head is scaled ×20 so that greedy answers keep a
    margin: batched and batch-1 answers can then be compared for identity."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    if size == "tiny":
        cfg = tiny_model_config(tokenizer_dir, "vib", llm_dtype="auto", encoder_dtype="auto")
    else:
        cfg = dict(arch="minigpt4", tokenizer_path=tokenizer_dir, llm_preset="vicuna-7b", mm_projector_type="vib",
                   llm_path=llm_path, low_resource=low_resource, encoder_device=encoder_device,
                   vib=dict(num_samples=3, beta=1e-7, adaptive=True), max_txt_len=512)
    # Random init directly on the device: a 7B model initialised on the CPU would take minutes.
    with torch.device(device) if llm_path is None else contextlib.nullcontext():
        model = build_model(cfg, device=device)
    head = model.llm.lm_head.weight
    if head.dtype.is_floating_point:  # (bitsandbytes keeps the LM head unquantized)
        with torch.no_grad():
            head.mul_(20.0)  # margin-safe greedy decoding
            # 7B: the LLM keeps Vicuna's 32,000-way head (same compute) but the offline tokenizer knows only its
            # first few hundred ids; zero logits for the rest keep greedy answers decodable, hence comparable.
            if model.tokenizer is not None:
                head[len(model.tokenizer):].zero_()
    return model, cfg


def llm_matmul_params(model) -> int:
    """N of the MFU formula: the LLM's parameters without the input-embedding table (a lookup, not a matmul)."""
    embed = model.llm.get_input_embeddings().weight
    return sum(p.numel() for p in model.llm.parameters() if p is not embed)


class Bench:
    """What the steps of one benchmark run share: the settings, the model, the report and what is extrapolated."""

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


def check_arguments(args: argparse.Namespace) -> torch.device:
    """The device the arguments ask for; SystemExit with the reason where they cannot run together."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.size == "7b" and device.type != "cuda":
        raise SystemExit("--size 7b runs on a GPU (random 7B weights in bf16); use --device cuda")
    if args.low_resource and args.size != "7b":
        raise SystemExit("--low-resource measures the 7B model; add --size 7b")
    return device


def start(args: argparse.Namespace) -> Bench:
    """Check the arguments, make the scratch folder and the offline tokenizer, and record the machine."""
    device = check_arguments(args)
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
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    meta = {
        "device": str(device),
        "device_name": device_name,
        "size": args.size,
        "quick": args.quick,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "gpu_measured": device.type == "cuda",
        "weights": "random (nothing downloaded)",
        "mfu_formula": MFU_FORMULA,
        "greedy_margin": "LM head scaled ×20 so batched and batch-1 greedy answers are comparable",
        "preset": preset,
        "transformers": transformers.__version__,
    }
    return Bench(args, device, preset, workdir, out, tokenizer_dir, meta, began)
