"""The training engine: data order, resume to the bit, kill/preemption, DDP on 2 processes, accumulation,
atomic checkpoints, non-finite steps. Everything runs the toy of tests/_toy_train.py on CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from minigpt4.models.checkpoints import CheckpointError, load_trainable_tensors
from minigpt4.runners import checkpointing
from minigpt4.runners.checkpointing import (
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minigpt4.runners.config import RunConfig
from minigpt4.runners.data_order import EpochBatchSampler, EpochSlice, epoch_micro_batches
from minigpt4.runners.metrics import TIMING_FIELDS, read_metrics, truncate_metrics
from minigpt4.runners.runner import Runner

REPO = Path(__file__).resolve().parents[1]
TOY_SCRIPT = REPO / "tests" / "_toy_train.py"
_spec = importlib.util.spec_from_file_location("_toy_train", TOY_SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

# 2 epochs of 4 optimizer steps, 2 micro-batches of 2 each; the reference run every test compares against.
RUN_ARGS = ["--iters", "4", "--epochs", "2", "--accum", "2", "--save-every", "1"]


def run_toy(out: Path, *extra: str) -> tuple[dict, Runner]:
    return toy.main([str(out), *RUN_ARGS, "--dump-dir", str(out / "dump"), *extra])


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def deterministic_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_run(out: Path, ref: Path) -> None:
    mine, theirs = torch.load(out / "dump" / "rank0.pt"), torch.load(ref / "dump" / "rank0.pt")
    assert_same(mine["trainable"], theirs["trainable"], "trainable")
    assert_same(mine["optimizer"], theirs["optimizer"], "optimizer")
    assert deterministic_metrics(out) == deterministic_metrics(ref)
    assert_same(load_file(out / "final" / "trainable.safetensors"),
                load_file(ref / "final" / "trainable.safetensors"), "final")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    summary, _ = run_toy(out)
    assert summary["completed"] and summary["global_step"] == 8 and not summary["preempted"]
    assert len(read_metrics(out / "metrics.jsonl")) == 8
    return out


# ---- data order -----------------------------------------------------------------------------------------------------


def test_sampler_shards_cover_contiguous_slices_and_skip_by_index():
    def keys(rank: int, start: int = 0, num_batches: int = 5) -> list[list[int]]:
        sampler = EpochBatchSampler(23, EpochSlice(batch_size=2, rank=rank, world_size=2, seed=7, epoch=3,
                                                   num_batches=num_batches, start=start))
        return [[i for i, _ in samples] for samples, _ in sampler]

    r0, r1 = keys(0), keys(1)
    perm = np.random.default_rng([7, 3, 0]).permutation(23)
    for j in range(5):  # the two ranks of micro-step j read one contiguous slice of the epoch's permutation
        assert r0[j] + r1[j] == perm[4 * j: 4 * j + 4].tolist()
    assert keys(0) == r0  # deterministic
    assert keys(0, start=3) == r0[3:]  # resuming skips by index
    long = keys(0, num_batches=12)  # 5 micro-batches per pass: passes 1 and 2 are new permutations
    assert long[:5] == r0 and long[5:10] != r0 and sorted(sum(long[5:10], [])) != sorted(sum(r0, []))
    other_epoch = EpochBatchSampler(23, EpochSlice(batch_size=2, rank=0, world_size=2, seed=7, epoch=4,
                                                   num_batches=5))
    assert [[i for i, _ in s] for s, _ in other_epoch] != r0


def test_loading_is_seeded_per_sample_and_leaves_the_training_rng_alone():
    dataset = toy.ToyDataset(n=16)
    common = dict(batch_size=2, rank=0, world_size=1, seed=3, epoch=0, num_batches=6)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    in_process = list(epoch_micro_batches(dataset, toy.collate, EpochSlice(start=0, **common), num_workers=0,
                                          pin_memory=False))
    assert torch.equal(torch.get_rng_state(), before)  # augmentation/collate did not consume the model's stream
    with_workers = list(epoch_micro_batches(dataset, toy.collate, EpochSlice(start=2, **common), num_workers=2,
                                            pin_memory=False))
    assert len(in_process) == 6 and len(with_workers) == 4
    for a, b in zip(in_process[2:], with_workers):  # same random crops and prompts, whoever loads them
        assert_same(a, b)
    assert not torch.equal(in_process[0]["x"], dataset.x[:2])  # the augmentation did draw noise


# ---- resume, kill, preemption ---------------------------------------------------------------------------------------


def test_resume_is_bitwise_identical(tmp_path, reference):
    out = tmp_path / "split"
    first, _ = run_toy(out, "--stop-after", "3")  # stops mid-epoch 0
    assert first["global_step"] == 3 and not first["completed"] and first["final_dir"] is None
    assert latest_checkpoint(out).name == "step_00000003"
    second, _ = run_toy(out, "--resume")
    assert second["completed"] and second["global_step"] == 8
    assert_same_run(out, reference)


# The kill tests signal a real run at a seeded step. The run is held in the forward after that step (the toy's
# --hold-after-step) until the signal comes, so it can neither finish first nor be signalled too early however
# loaded the machine is; the tests wait for what the run writes once the step is done, and fail saying so if that
# never comes.
KILL_SEED = 26
READY_LIMIT_S = 120.0


def _toy_process(out: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(out), *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_LIMIT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the toy run exited ({proc.returncode}) before {what}; its stderr: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the toy run did not reach {what} within {READY_LIMIT_S:.0f} s; its stderr: "
                        f"{log.read_text()[-2000:]}")
        time.sleep(0.01)


def _latest_step(out: Path) -> int | None:
    pointer = out / "checkpoints" / "latest"  # replaced atomically once a checkpoint is complete
    return int(pointer.read_text().strip().split("_")[1]) if pointer.is_file() else None


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference):
    out = tmp_path / "killed"
    target = random.Random(KILL_SEED).randint(2, 5)  # seeded: the same kill point on every run
    log = tmp_path / "toy.log"
    proc = _toy_process(out, log, *RUN_ARGS, "--hold-after-step", str(target))
    try:
        _wait_for(proc, lambda: _latest_step(out) == target, f"checkpoint {target} (checkpoints/latest)", log)
        proc.send_signal(signal.SIGKILL)  # during step target + 1, before its checkpoint
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    assert latest_checkpoint(out).name == f"step_{target:08d}"
    summary, _ = run_toy(out, "--resume")
    assert summary["completed"], f"killed after checkpoint {target}"
    assert_same_run(out, reference)


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, reference):
    out = tmp_path / "preempted"
    log = tmp_path / "toy.log"
    proc = _toy_process(out, log, "--iters", "4", "--epochs", "2", "--accum", "2", "--hold-after-step", "2")
    try:  # The handler is installed before step 1, so once step 2's metrics line is written it is in place.
        _wait_for(proc, lambda: len(read_metrics(out / "metrics.jsonl")) == 2, "step 2 (its metrics line)", log)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=READY_LIMIT_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr: {log.read_text()[-2000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    # SIGTERM came during step 3: that step finishes, is checkpointed, and the run stops.
    assert summary["preempted"] and not summary["completed"] and summary["global_step"] == 3
    assert latest_checkpoint(out).name == "step_00000003"
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    run_toy(out, "--resume")
    assert_same_run(out, reference)


# ---- DDP ------------------------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_stay_identical_and_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    args = ["--iters", "3", "--epochs", "1", "--accum", "2", "--save-every", "1", "--no-noise"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(TOY_SCRIPT),
         str(out), *args, "--batch-size", "2", "--dump-dir", str(out / "dump")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "dump" / "rank0.pt"), torch.load(out / "dump" / "rank1.pt")
    assert (rank0["world_size"], rank1["rank"]) == (2, 1)
    assert_same(rank0["trainable"], rank1["trainable"], "trainable")
    assert_same(rank0["optimizer"], rank1["optimizer"], "optimizer")

    # Only rank 0 wrote: one metrics line per step, checkpoints with exactly the two files each.
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    for step_dir in ckpts.glob("step_*"):
        assert sorted(p.name for p in step_dir.iterdir()) == ["state.pt", "trainable.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "dump", "final", "metrics.jsonl"]
    rng = load_checkpoint(ckpts / "step_00000003")[1]["rng_states"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one RNG state per rank

    # 2 ranks x batch 2 read exactly what 1 process x batch 4 reads: the same training, up to float rounding.
    single = tmp_path / "single"
    toy.main([str(single), *args, "--batch-size", "4", "--dump-dir", str(single / "dump")])
    one = torch.load(single / "dump" / "rank0.pt")["trainable"]
    for name, tensor in rank0["trainable"].items():
        torch.testing.assert_close(tensor, one[name], rtol=1e-5, atol=1e-6)
    ddp_loss = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    single_loss = [r["loss"] for r in read_metrics(single / "metrics.jsonl")]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)


def test_torchrun_failed_checkpoint_write_stops_every_rank_with_the_same_error(tmp_path):
    """Rank 0 alone writes; its full disk at step 2 reaches rank 1 as the same one-line error at once, instead
    of rank 1 walking into step 3's collective and dying there of a lost peer (gloo) or hanging (NCCL)."""
    out = tmp_path / "ddp_full_disk"
    args = ["--iters", "3", "--epochs", "1", "--accum", "2", "--save-every", "1", "--no-noise", "--batch-size", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(TOY_SCRIPT),
         str(out), *args, "--fail-save-at", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    errors = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in result.stderr.splitlines()
              if line.startswith("error: rank ")}
    assert set(errors) == {"rank 0", "rank 1"}, result.stderr[-3000:]
    assert errors["rank 1"] == errors["rank 0"]
    assert "step_00000002: No space left on device" in errors["rank 0"]
    assert "The previous checkpoint (step_00000001) is untouched" in errors["rank 0"]
    assert "Connection closed by peer" not in result.stderr and "terminate called" not in result.stderr
    assert latest_checkpoint(out).name == "step_00000001"


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    common = ["--iters", "3", "--epochs", "1", "--no-noise"]
    toy.main([str(tmp_path / "big"), *common, "--batch-size", "4", "--accum", "1", "--dump-dir", str(tmp_path / "b")])
    toy.main([str(tmp_path / "acc"), *common, "--batch-size", "2", "--accum", "2", "--dump-dir", str(tmp_path / "a")])
    big, acc = torch.load(tmp_path / "b" / "rank0.pt"), torch.load(tmp_path / "a" / "rank0.pt")
    for name, tensor in big["trainable"].items():
        torch.testing.assert_close(acc["trainable"][name], tensor, rtol=1e-5, atol=1e-6)
    big_m, acc_m = deterministic_metrics(tmp_path / "big"), deterministic_metrics(tmp_path / "acc")
    assert [r["loss"] for r in acc_m] == pytest.approx([r["loss"] for r in big_m], rel=1e-5)


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    first = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    save_checkpoint(tmp_path, 1, first, {"global_step": 1})

    def disk_full(obj, path):
        Path(path).write_bytes(b"half a state")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "_write_torch", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left.*step_00000001"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3, 3), "b": torch.zeros(3)}, {"global_step": 2})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    tensors, state = load_checkpoint(tmp_path)
    assert_same(tensors, first) and state["global_step"] == 1


def test_training_survives_a_failed_save_through_resume(tmp_path, monkeypatch, reference):
    out = tmp_path / "diskfull"
    real_write = checkpointing._write_torch

    def fail_at_step_5(obj, path):
        if "step_00000005" in str(path):
            raise OSError(28, "No space left on device")
        real_write(obj, path)

    monkeypatch.setattr(checkpointing, "_write_torch", fail_at_step_5)
    with pytest.raises(CheckpointWriteError):
        run_toy(out)
    monkeypatch.setattr(checkpointing, "_write_torch", real_write)
    assert latest_checkpoint(out).name == "step_00000004"
    run_toy(out, "--resume")
    assert_same_run(out, reference)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged_file", ["state.pt", "trainable.safetensors"])
def test_resume_passes_over_a_damaged_newest_checkpoint_and_matches_uninterrupted(tmp_path, reference, caplog,
                                                                                   damaged_file):
    out = tmp_path / "damaged"
    run_toy(out, "--stop-after", "5")  # keep_last=2 kept step_00000004 and step_00000005
    _truncate(out / "checkpoints" / "step_00000005" / damaged_file)
    with pytest.raises(CheckpointError, match=f"step_00000005/{damaged_file} is truncated or damaged"):
        load_checkpoint(out / "checkpoints" / "step_00000005")
    with caplog.at_level("WARNING", logger="minigpt4.runners.runner"):
        summary, _ = run_toy(out, "--resume")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"step_00000005/{damaged_file} is truncated or damaged" in warning
    assert "resuming from" in warning and "step_00000004 instead" in warning
    assert summary["completed"]
    assert_same_run(out, reference)  # through the fallback, bitwise equal to the uninterrupted run


def _poison(step_dir: Path, where: str) -> str:
    """Write NaN into the first trainable tensor, or +inf into an optimizer moment; the name the error gives."""
    if where == "trainable":
        tensors = load_file(step_dir / "trainable.safetensors")
        name = sorted(tensors)[0]
        tensors[name].view(-1)[0] = float("nan")
        checkpointing.save_trainable(step_dir / "trainable.safetensors", tensors, {"step": "poisoned"})
        return f"trainable.safetensors: tensor {name!r}"
    state = torch.load(step_dir / "state.pt", weights_only=True)
    param_id = sorted(state["optimizer"]["state"])[0]
    state["optimizer"]["state"][param_id]["exp_avg_sq"].view(-1)[0] = float("inf")
    torch.save(state, step_dir / "state.pt")
    return f"state.pt: tensor 'optimizer.state.{param_id}.exp_avg_sq'"


@pytest.mark.parametrize("where", ["trainable", "optimizer"])
def test_resume_passes_over_a_non_finite_newest_checkpoint(tmp_path, reference, caplog, where):
    """NaN/inf in a trainable tensor or an optimizer moment counts as damage: the resume warns, naming the file
    and the tensor, and falls back to the newest finite checkpoint; refused only when none is finite."""
    out = tmp_path / "poisoned"
    run_toy(out, "--stop-after", "5")  # keep_last=2 kept step_00000004 and step_00000005
    written = load_checkpoint(out / "checkpoints" / "step_00000005")
    named = _poison(out / "checkpoints" / "step_00000005", where)
    with caplog.at_level("WARNING", logger="minigpt4.runners.runner"):
        summary, _ = run_toy(out, "--resume", "--stop-after", "5")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"step_00000005/{named} contains NaN or inf values" in warning
    assert "resuming from" in warning and "step_00000004 instead" in warning
    assert summary["global_step"] == 5  # step 5 taken again from step 4: the same tensors as first written
    redone = load_checkpoint(out / "checkpoints" / "step_00000005")
    assert_same(redone[0], written[0], "trainable")
    assert_same(redone[1]["optimizer"], written[1]["optimizer"], "optimizer")

    for step in (4, 5):  # every kept checkpoint non-finite: refused, each one named
        _poison(out / "checkpoints" / f"step_0000000{step}", where)
    with pytest.raises(CheckpointError) as info:
        run_toy(out, "--resume")
    message = str(info.value)
    assert "\n" not in message and message.startswith("no complete checkpoint to resume from in")
    assert all(f"step_0000000{step}/{named.split(':')[0]}" in message for step in (4, 5))


def test_resume_when_latest_names_a_deleted_folder_or_nothing_is_complete(tmp_path, caplog):
    out = tmp_path / "run"
    run_toy(out, "--stop-after", "3")
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    with caplog.at_level("WARNING", logger="minigpt4.runners.runner"):
        summary, _ = run_toy(out, "--resume", "--stop-after", "3")
    assert "names 'step_00000003', which is not a checkpoint directory" in caplog.text
    assert summary["global_step"] == 3 and latest_checkpoint(out).name == "step_00000003"

    for step_dir in (out / "checkpoints").glob("step_*"):  # every checkpoint damaged: refused, each one named
        _truncate(step_dir / "state.pt")
    with pytest.raises(CheckpointError) as info:
        run_toy(out, "--resume")
    message = str(info.value)
    assert "\n" not in message and message.startswith("no complete checkpoint to resume from in")
    assert "step_00000003/state.pt is truncated" in message and "step_00000002/state.pt is truncated" in message
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    with pytest.raises(CheckpointError, match="latest names 'step_00000003', which is not a checkpoint"):
        run_toy(out, "--resume")  # `latest` pointing nowhere, nothing left to fall back to


def test_stale_final_temporaries_are_swept(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"global_step": 1})
    (tmp_path / ".tmp-final-99999").mkdir()
    (tmp_path / ".tmp-final-99999" / "trainable.safetensors").write_bytes(b"half")
    old_final = tmp_path / ".old-final-99999"  # killed between the two renames of save_final: no final/ left
    old_final.mkdir()
    (old_final / "config.json").write_text("{}")
    checkpointing.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final"]
    assert (tmp_path / "final" / "config.json").read_text() == "{}"


def test_keep_last_and_strict_loading(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"global_step": step}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003",
                                                                           "step_00000004"]
    model = nn.Linear(2, 3)
    good = {"weight": torch.ones(3, 2), "bias": torch.ones(3)}
    load_trainable_tensors(model, good, "ckpt")  # the resume's check is the loaders' (models/checkpoints.py)
    assert torch.equal(model.weight, torch.ones(3, 2))
    with pytest.raises(CheckpointError, match=r"from ckpt: 1 trainable parameter\(s\) not in the file: bias"):
        load_trainable_tensors(model, {"weight": torch.ones(3, 2)}, "ckpt")
    with pytest.raises(CheckpointError, match=r"1 key\(s\) the model does not have: extra"):
        load_trainable_tensors(model, {**good, "extra": torch.ones(1)}, "ckpt")
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \(2, 3\) vs model \(3, 2\)"):
        load_trainable_tensors(model, {**good, "weight": torch.ones(2, 3)}, "ckpt")
    model.bias.requires_grad_(False)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) the model keeps frozen .*: bias"):
        load_trainable_tensors(model, good, "ckpt")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_resume_refuses_other_data_order_and_fresh_start_refuses_old_run(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "--stop-after", "2")
    with pytest.raises(CheckpointError, match="grad_accum_steps: checkpoint 2, now 1"):
        toy.main([str(out), "--iters", "4", "--epochs", "2", "--accum", "1", "--resume"])
    with pytest.raises(CheckpointError, match="set run.resume: true"):
        run_toy(out)


def test_metrics_truncation_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


# ---- non-finite losses, precision, streams --------------------------------------------------------------------------


def _runner(out: Path, model: nn.Module, **cfg: Any) -> Runner:
    torch.set_num_threads(1)
    settings = dict(output_dir=str(out), device="cpu", amp="none", batch_size=2, iters_per_epoch=3, max_epoch=1,
                    lr_sched="constant", init_lr=1e-2, num_workers=0, log_every=1, progress_bar=False)
    return Runner(model, toy.ToyDataset(augment=False), toy.collate, RunConfig(**{**settings, **cfg}))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    clean = _runner(tmp_path / "clean", toy.ToyModel(noise=False), max_steps=1)
    clean.train()
    torch.manual_seed(0)
    poisoned_model = toy.ToyModel(noise=False, nan_calls=frozenset({2}))
    poisoned = _runner(tmp_path / "nan", poisoned_model, max_steps=2)
    summary = poisoned.train()
    assert summary["skipped_nonfinite"] == 1
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert records[1]["loss"] is None and records[1]["skipped_nonfinite"] == 1 and records[1]["grad_norm"] is None
    # step 2 changed nothing: the weights are those after step 1
    assert_same(dict(poisoned_model.named_parameters()), dict(clean.model.named_parameters()))


def test_nonfinite_steps_in_a_row_abort(tmp_path):
    model = toy.ToyModel(noise=False, nan_calls=frozenset(range(1, 100)))
    with pytest.raises(RuntimeError, match="non-finite for 2 optimizer steps in a row") as info:
        _runner(tmp_path, model, max_nonfinite_steps=2, iters_per_epoch=5).train()
    # nothing else is to blame here (the toy multiplies its loss by NaN), so the advice is about the numerics
    assert "weights and this step's inputs are all finite" in str(info.value) and "run.init_lr" in str(info.value)


class _BetaToy(toy.ToyModel):
    """The toy with a KL-like term weighted by `vib.beta`, as MiniGPT4's VIB projector weights its KL by
    model.vib.beta (MiniGPT4.vib)."""

    def __init__(self, beta: float):
        from minigpt4.common.config import VIBConfig

        super().__init__(noise=False)
        self.vib = VIBConfig(beta=beta)

    def forward(self, batch):
        out = super().forward(batch)
        return {**out, "loss": out["loss"] + self.vib.beta * out["sigma"]}


def test_nonfinite_loss_from_a_nan_config_value_stops_at_once_naming_it(tmp_path):
    from minigpt4.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"step 1: the loss is not finite; a config value is to blame: "
                                          r"model\.vib\.beta = nan") as info:
        _runner(tmp_path, _BetaToy(float("nan")), max_nonfinite_steps=5).train()
    assert "init_lr" not in str(info.value)  # not the advice to lower the learning rate


@pytest.mark.parametrize("poison, named", [
    (lambda m: m.encoder[0].weight, "frozen parameter(s) or buffer(s) encoder.0.weight hold NaN/inf"),
    (lambda m: m.mean_head.weight, "trainable parameter(s) mean_head.weight hold NaN/inf before any optimizer step"),
])
def test_nonfinite_loss_from_the_weights_stops_at_once_naming_them(tmp_path, poison, named):
    from minigpt4.runners.nonfinite import NonFiniteLossError

    model = toy.ToyModel(noise=False)
    with torch.no_grad():
        poison(model)[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss is not finite; the weights are to blame") as info:
        _runner(tmp_path, model).train()
    assert named in str(info.value)


def test_nonfinite_inputs_are_named_and_their_steps_skipped(tmp_path, caplog):
    dataset = toy.ToyDataset(augment=False)
    dataset.x[5, 2] = float("nan")  # one bad sample: the step that reads it is skipped, the others train
    cfg = RunConfig(output_dir=str(tmp_path), device="cpu", amp="none", batch_size=2, iters_per_epoch=4,
                    max_epoch=2, lr_sched="constant", init_lr=1e-2, num_workers=0, log_every=1, progress_bar=False,
                    shuffle=False)  # each epoch reads samples 0-7 in order: sample 5 is in step 3 of each
    torch.set_num_threads(1)
    summary = Runner(toy.ToyModel(noise=False), dataset, toy.collate, cfg).train()
    assert summary["completed"] and summary["skipped_nonfinite"] == 2
    warnings = [r.getMessage() for r in caplog.records if "the inputs are to blame" in r.getMessage()]
    assert len(warnings) == 2 and "step 3: the loss is not finite" in warnings[0], warnings
    assert "'x' of batch row(s) [1] holds NaN/inf values" in warnings[0]


def test_input_diagnosis_names_samples_whose_pixels_or_embeddings_are_not_finite(tiny_model_factory):
    from minigpt4.runners.nonfinite import input_problems

    model = tiny_model_factory("vib")
    pixels = torch.zeros(2, 3, 28, 28)
    pixels[1, 0, 3, 3] = float("nan")
    batch = {"image": pixels, "answer": ["a", "b"], "id": ["img-1", "img-2"]}
    assert input_problems(model, [batch], rerun_model=True) == ["'image' of sample(s) img-2 holds NaN/inf values."]
    with torch.no_grad():  # finite pixels, an encoder that overflows: named as the embeddings, not the pixels
        model.encoder.ln_vision.weight.fill_(float("inf"))
    found = input_problems(model, [{**batch, "image": torch.zeros(2, 3, 28, 28)}], rerun_model=True)
    assert len(found) == 1 and "image embeddings (encoder output) of sample(s) img-1, img-2" in found[0], found


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path):
    model = toy.ToyModel()
    matmul_dtypes = []  # what autocast changes: the Linear layers inside the step compute in bf16
    for layer in (model.encoder[0], model.mean_head):
        layer.register_forward_hook(lambda module, args, out: matmul_dtypes.append(out.dtype))
    summary = _runner(tmp_path / "bf16", model, amp="bf16", iters_per_epoch=2, max_grad_norm=1.0).train()
    assert summary["completed"] and np.isfinite(summary["last_metrics"]["loss"])
    assert summary["last_metrics"]["grad_norm"] is not None
    assert matmul_dtypes and set(matmul_dtypes) == {torch.bfloat16}, matmul_dtypes
    assert model.mean_head.weight.dtype == torch.float32  # the weights themselves stay fp32
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        _runner(tmp_path / "fp16", toy.ToyModel(), amp="fp16")


def test_iterable_dataset_runs_fixed_iterations(tmp_path):
    summary, _ = toy.main([str(tmp_path / "stream"), "--iterable", "--iters", "40", "--epochs", "1", "--accum", "1"])
    assert summary["completed"] and summary["global_step"] == 40  # 40 batches of 2 > the 64-sample stream
    with pytest.raises(ValueError, match="iters_per_epoch must be set"):
        Runner(toy.ToyModel(), toy.ToyStream(), toy.collate,
               RunConfig(output_dir=str(tmp_path / "x"), device="cpu", amp="none"))
