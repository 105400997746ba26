"""GPU-only checks (run by scripts/gpu_check.sh; skipped where torch sees no CUDA device): half-precision
numerics against fp32 on the tiny model, one fp16 training step with the GradScaler, the 8-bit low-resource
path (if bitsandbytes is importable) through the real builder and Runner, and the benchmark's CUDA code path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


class Captions(Dataset):
    def __init__(self, n: int = 8):
        self.images = torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "answer": "a red circle next to a small blue square" + " and a star" * (i % 3)}


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "answer": [it["answer"] for it in items]}


def _batch() -> dict:
    return collate([Captions()[i] for i in range(4)])


def _tiny(tokenizer_dir: str, **overrides):
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_config(tokenizer_dir, "vib", **overrides), device=CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_matches_fp32(tiny_tokenizer_dir, dtype):
    model = _tiny(tiny_tokenizer_dir)
    model.eval()  # z = μ: no noise, so the two precisions see the same inputs
    batch = _batch()
    with torch.no_grad():
        ref = model(batch)
        with torch.autocast("cuda", dtype=dtype):
            half = model(batch)
    for key in ("loss", "ce", "kl", "alpha", "entropy_ratio", "sigma"):
        assert torch.isfinite(half[key]), key
        assert half[key].dtype == torch.float32, f"{key} must be reported in fp32"
        torch.testing.assert_close(half[key], ref[key], rtol=3e-2, atol=1e-3, msg=f"{key} under {dtype}")
    # entropy and KL are computed in fp32 inside autocast (vib.py): their values barely move
    torch.testing.assert_close(half["entropy_ratio"], ref["entropy_ratio"], rtol=1e-3, atol=1e-5)


def _runner_cfg(out: Path, **overrides):
    from minigpt4.runners.config import RunConfig

    values = dict(output_dir=str(out), device="cuda", batch_size=2, grad_accum_steps=2, max_epoch=1, init_lr=1e-3,
                  lr_sched="constant", num_workers=0, pin_memory=True, log_every=1, progress_bar=False,
                  save_every_steps=1)
    values.update(overrides)
    return RunConfig(**values)


def _trained(model, out: Path, **overrides) -> dict:
    from safetensors.torch import load_file

    from minigpt4.models.checkpoints import trainable_tensors
    from minigpt4.runners.runner import Runner

    before = {k: v.detach().clone() for k, v in trainable_tensors(model).items()}
    # 8 optimizer steps: under fp16 the GradScaler may skip the first ones (inf gradients at its initial scale)
    summary = Runner(model, Captions(32), collate, _runner_cfg(out, **overrides)).train()
    assert summary["completed"] and summary["global_step"] == 8 and summary["skipped_nonfinite"] == 0
    saved = load_file(out / "final" / "trainable.safetensors")
    assert sorted(saved) == sorted(before)
    assert any(not torch.equal(saved[k], before[k].cpu()) for k in before), "the projector did not change"
    return summary


def test_fp16_training_step_with_grad_scaler(tiny_tokenizer_dir, tmp_path):
    from minigpt4.runners.checkpointing import latest_checkpoint, load_checkpoint

    model = _tiny(tiny_tokenizer_dir)
    summary = _trained(model, tmp_path, amp="fp16")
    assert torch.isfinite(torch.tensor(summary["last_metrics"]["loss"]))
    _, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["scaler"] and state["scaler"]["scale"] > 0  # the scaler's state is checkpointed


def test_low_resource_8bit_llm_with_cpu_encoder_trains(tiny_tokenizer_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minigpt4.common.tiny_models import TINY_LLM, tiny_model_config
    from minigpt4.models.from_config import build_model

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**TINY_LLM, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id))
    llm.save_pretrained(tmp_path / "llm")
    cfg = tiny_model_config(tiny_tokenizer_dir, "vib", llm_path=str(tmp_path / "llm"), low_resource=True,
                            encoder_device="cpu", llm_dtype="fp16", encoder_dtype="auto")
    model = build_model(cfg, device=CUDA)
    assert getattr(model.llm, "is_loaded_in_8bit", False)
    assert next(model.encoder.parameters()).device.type == "cpu"
    assert next(model.encoder.parameters()).dtype == torch.float32  # auto is fp32 on the CPU
    assert all(p.device.type == "cuda" for p in model.projector.parameters())
    _trained(model, tmp_path / "run", amp="fp16")  # Runner must not .to() the 8-bit model or the CPU encoder
    assert next(model.encoder.parameters()).device.type == "cpu"
    answers = model.generate(["###Human: <Img><ImageHere></Img> what is it?###Assistant:"], _batch()["image"][:1],
                             max_new_tokens=4)
    assert len(answers) == 1


def test_benchmark_cuda_path_quick(tmp_path):
    """The benchmark's GPU-only branches (fp32 row, bf16 autocast, CUDA memory and profiler, MFU maths) on the
    tiny model, before gpu_check.sh spends minutes on the 7B run."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cuda", "--size",
                             "tiny", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {r["name"] for r in report["rows"]}
    assert "train: precision" in names
    precision = next(r for r in report["rows"] if r["name"] == "train: precision")
    assert precision["baseline"] is not None and precision["baseline"]["memory_method"] == "cuda.max_memory_allocated"
    assert report["extrapolated"]["train_tflops_4N"] > 0
    assert (tmp_path / "bench_profile.txt").read_text().count("\n") > 10
