"""`run.distributed: fsdp` on CPU (gloo, 2 processes): a tiny MiniGPT-4 with a frozen LLM sharded over the ranks
and only the projector trained trains like one process, writes the usual trainable.safetensors / state.pt
and resumes exactly.

This file is also the torchrun script the test launches (it trains OUT/full, then, in the same processes,
resumes a copy of its step-2 checkpoint in OUT/resumed):
    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/test_fsdp.py OUT TOKENIZER
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]

STEPS = 4  # 16 samples, 4 per optimizer step (2 ranks × 2, or 1 process × 4)


class SameLengthCaptions(Dataset):
    """Distinct random images, one caption for all: every sequence has the same token count, so the token-mean
    CE of 2 ranks × 2 equals that of 1 process × 4 and the two runs can be compared exactly."""

    def __init__(self, n: int = 16):
        self.images = torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "answer": "a red circle next to a blue square"}


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "answer": [it["answer"] for it in items]}


def train(out: str, tokenizer_dir: str, distributed: str, batch_size: int, resume: bool = False):
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model
    from minigpt4.runners.config import RunConfig
    from minigpt4.runners.runner import Runner

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial projector on every rank and in every run
    # No noise (z = μ) so that ranks and the single process draw nothing that could differ; the KL stays on.
    cfg = tiny_model_config(tokenizer_dir, "vib", vib=dict(num_samples=2, beta=1e-2, adaptive=True,
                                                          reparameterize=False))
    model = build_model(cfg)
    run = RunConfig(output_dir=out, device="cpu", batch_size=batch_size, grad_accum_steps=1, max_epoch=1,
                    lr_sched="linear_warmup_cosine", init_lr=1e-2, amp="none",
                    num_workers=0, pin_memory=False, log_every=1, progress_bar=False, save_every_steps=1,
                    keep_last=0, distributed=distributed, shuffle=False, resume=resume)
    runner = Runner(model, SameLengthCaptions(), collate, run)
    return runner.train(), runner


def local_sizes(model) -> dict[str, int]:
    """Elements this rank holds of the frozen LLM (about half of it per rank under FSDP) and of each trainable
    tensor (whole on every rank)."""
    sizes = {"llm": sum(p.numel() for n, p in model.named_parameters() if ".llm." in f".{n}")}
    sizes.update({n.replace("_fsdp_wrapped_module.", ""): p.numel() for n, p in model.named_parameters()
                  if p.requires_grad})
    return sizes


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """A run folder holding only `src_run`'s checkpoint of `step` (and its metrics up to there)."""
    name = f"step_{step:08d}"
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)
    (dst_run / "checkpoints" / "latest").write_text(name + "\n")
    lines = open(src_run / "metrics.jsonl").read().splitlines()[:step]
    (dst_run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def sharded_main(out: Path, tokenizer_dir: str) -> None:
    from minigpt4.common import dist

    _, runner = train(str(out / "full"), tokenizer_dir, "fsdp", batch_size=2)
    if dist.is_main():
        (out / "sizes.json").write_text(json.dumps(local_sizes(runner.model)))
        copy_checkpoint(out / "full", 2, out / "resumed")
    dist.barrier()
    train(str(out / "resumed"), tokenizer_dir, "fsdp", batch_size=2, resume=True)
    dist.cleanup()


def _launch(out: Path, tokenizer_dir: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__,
         str(out), tokenizer_dir],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tmp_path, tiny_tokenizer_dir):
    from safetensors.torch import load_file

    from minigpt4.runners.checkpointing import load_checkpoint

    _launch(tmp_path, tiny_tokenizer_dir)
    sharded = tmp_path / "full"
    single = tmp_path / "single"
    summary, runner = train(str(single), tiny_tokenizer_dir, "ddp", batch_size=4)
    assert summary["completed"] and summary["global_step"] == STEPS

    # The frozen LLM is sharded (rank 0 holds about half of it), the projector is whole.
    per_rank, whole = json.loads((tmp_path / "sizes.json").read_text()), local_sizes(runner.model)
    assert sorted(per_rank) == sorted(whole) and len(whole) > 3
    assert 0.4 * whole["llm"] < per_rank["llm"] < 0.6 * whole["llm"]
    assert all(per_rank[n] == whole[n] for n in whole if n != "llm")

    # Same files, same tensor names and shapes as a DDP / single-process run: only the projector is saved.
    mine = load_file(sharded / "final" / "trainable.safetensors")
    ref = load_file(single / "final" / "trainable.safetensors")
    assert sorted(mine) == sorted(ref) and all(k.startswith("projector.") for k in mine)
    for name in ref:
        assert mine[name].shape == ref[name].shape
        # lr 1e-2 over 4 Adam steps: a different reduction order moves a weight by ~1e-6 at most
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-3, atol=1e-5)
    assert _losses(sharded) == pytest.approx(_losses(single), rel=1e-4)
    tensors, state = load_checkpoint(sharded / "checkpoints" / f"step_{STEPS:08d}")
    _, ref_state = load_checkpoint(single / "checkpoints" / f"step_{STEPS:08d}")
    assert [g["param_names"] for g in state["optimizer"]["param_groups"]] == \
        [g["param_names"] for g in ref_state["optimizer"]["param_groups"]]
    assert sorted(state["optimizer"]["state"]) == sorted(ref_state["optimizer"]["state"])  # integer ids
    for i, s in ref_state["optimizer"]["state"].items():  # gathered, full-size moments
        torch.testing.assert_close(state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], rtol=1e-3, atol=1e-7)

    # Resumed from step 2 under FSDP: the same result as the uninterrupted run, to the bit.
    resumed = tmp_path / "resumed"
    again = load_file(resumed / "final" / "trainable.safetensors")
    for name in mine:
        torch.testing.assert_close(again[name], mine[name], rtol=0, atol=0)
    assert _losses(resumed) == _losses(sharded)


def test_place_model_keeps_a_deliberately_split_model_where_it_is():
    """model.encoder_device: cpu leaves the frozen encoder on another device than the LLM: the runner must not
    move it back (nor .to() an 8-bit LLM), but the trainable parameters must be on the run device."""
    from torch import nn

    from minigpt4.runners.placement import has_fixed_placement, place_model

    model = nn.Module()
    model.encoder = nn.Linear(2, 2, device="meta").requires_grad_(False)  # "another device"
    model.projector = nn.Linear(2, 2)
    assert has_fixed_placement(model)
    assert place_model(model, torch.device("cpu")) is model and model.encoder.weight.is_meta
    model.projector.to("meta")
    model.encoder.to_empty(device="cpu")
    with pytest.raises(ValueError, match="trainable parameters are not on the run device"):
        place_model(model, torch.device("cpu"))
    plain = nn.Linear(2, 2)
    assert not has_fixed_placement(plain) and place_model(plain, torch.device("cpu")) is plain


def test_fsdp_refuses_an_8bit_or_split_model():
    from torch import nn

    from minigpt4.runners.placement import fsdp_wrap

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to("meta"))  # parts on two devices
    with pytest.raises(ValueError, match="encoder_device"):
        fsdp_wrap(model, torch.device("cpu"))


if __name__ == "__main__":
    sharded_main(Path(sys.argv[1]), sys.argv[2])
