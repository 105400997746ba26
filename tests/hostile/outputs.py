"""Resume and output folders (issue 13): damaged checkpoints, another data order, a fresh run over an old one,
failed or full-disk checkpoint writes, read-only folders, a folder another run holds, a stale lock."""
from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

from _hostile import GOOD_RGB, ROOT, TINY_RECIPE, Case, Env, Exits2, Holds, Raises, WarningRecords, no_model_build
from safetensors import SafetensorError

from minigpt4.models.checkpoints import CheckpointError
from minigpt4.runners.checkpointing import CheckpointWriteError

TOY_ARGS = ["--iters", "4", "--epochs", "1", "--accum", "1", "--save-every", "1"]  # 4 steps, keep_last=2


def _toy_run(env: Env, *extra: str) -> dict:
    """The CPU toy of tests/_toy_train.py through the real Runner, into {tmp}/run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_toy_train", ROOT / "tests" / "_toy_train.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    return toy.main([str(env.tmp / "run"), *TOY_ARGS, *extra])[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resume_past_damage(damage: Callable[[Path], None], fragment: str, env: Env) -> bool:
    _toy_run(env, "--stop-after", "3")
    damage(env.tmp / "run" / "checkpoints")
    records = WarningRecords()
    logger = logging.getLogger("minigpt4.runners.runner")
    logger.addHandler(records)
    try:
        summary = _toy_run(env, "--resume")
    finally:
        logger.removeHandler(records)
    warning = " ".join(records.messages)
    assert fragment.replace("{tmp}", str(env.tmp)) in warning, warning
    assert f"resuming from {env.tmp}/run/checkpoints/step_00000002 instead" in warning, warning
    assert summary["completed"] and summary["global_step"] == 4
    return True


def resume_with_every_checkpoint_damaged(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    for step_dir in (env.tmp / "run" / "checkpoints").glob("step_*"):
        _truncate(step_dir / "state.pt")
    _toy_run(env, "--resume")


def resume_with_other_data_order(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    _toy_run(env, "--resume", "--accum", "2")


def fresh_run_over_old_run(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    _toy_run(env)


def _raise(err: BaseException) -> Callable[..., None]:
    def fail(*_: Any) -> None:
        raise err
    return fail


def checkpoint_write_fails(writer: str, err: BaseException, at_step: int, env: Env) -> None:
    """The `writer` (checkpointing._write_torch / save_trainable) fails as a full or read-only disk does."""
    from minigpt4.runners import checkpointing

    real = getattr(checkpointing, writer)

    def write(*args: Any) -> None:  # (obj, path) or (path, tensors, metadata): fail for the step's files
        if any(isinstance(a, (str, os.PathLike)) and f"step_{at_step:08d}" in str(a) for a in args):
            raise err
        real(*args)

    with patch.object(checkpointing, writer, write):
        _toy_run(env)


def checkpoint_disk_too_full(env: Env) -> None:
    from minigpt4.runners import checkpointing

    with patch.object(checkpointing, "free_bytes", lambda path: 10_000):  # what statvfs says of a nearly full disk
        _toy_run(env)


def _no_half_written_checkpoint(env: Env) -> bool:
    root = env.tmp / "run" / "checkpoints"
    return not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def _train_argv(env: Env, *options: str) -> list[str]:
    return ["--cfg-path", TINY_RECIPE, "--options", *env.shared.tiny_data_options(),
            f"run.output_dir={env.tmp / 'out'}", "run.progress_bar=false", *options]


def train_resume_latest_nowhere(env: Env) -> tuple[int, str]:
    import train

    (env.tmp / "out" / "checkpoints").mkdir(parents=True)
    (env.tmp / "out" / "checkpoints" / "latest").write_text("step_00000004\n")  # its folder was deleted
    rc = train.main(_train_argv(env) + ["--resume"])
    assert not (env.tmp / "out" / "provenance.json").exists()  # a refused run leaves no record
    return rc, ""


def train_disk_full(env: Env) -> tuple[int, str]:
    import train
    from minigpt4.runners import checkpointing

    with patch.object(checkpointing, "free_bytes", lambda path: 10_000):
        rc = train.main(_train_argv(env, "run.max_steps=1", "run.save_every_steps=1"))
    assert not (env.tmp / "out" / "checkpoints" / "latest").exists()
    return rc, ""


def train_read_only_output_folder(env: Env) -> tuple[int, str]:
    import errno

    import train

    real_open = os.open

    def read_only(path, flags, *rest):  # the first write into the output folder is its lock file
        if str(path).endswith("/.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *rest)

    with patch.object(os, "open", read_only), no_model_build():
        rc = train.main(_train_argv(env))
    return rc, ""


def _held_by_this_process(folder: Path):
    from minigpt4.common.output_dir import claim_output_dir

    return claim_output_dir(folder, "a concurrent run")


def train_into_a_folder_in_use(env: Env) -> tuple[int, str]:
    import train

    with _held_by_this_process(env.tmp / "out"), no_model_build():
        rc = train.main(_train_argv(env))
    assert sorted(p.name for p in (env.tmp / "out").iterdir()) == []  # the holder's lock file is gone, nothing else
    return rc, ""


def evaluate_into_a_folder_in_use(env: Env) -> tuple[int, str]:
    import evaluate

    for folder in ("val2014", "annotations"):
        (env.tmp / folder).mkdir()
    (env.tmp / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    (env.tmp / "eval.yaml").write_text("eval: {}\n")
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={env.tmp}/out",
               "eval.device=cpu"]
    with _held_by_this_process(env.tmp / "out"), no_model_build():
        rc = evaluate.main(["--cfg-path", str(env.tmp / "eval.yaml"), "--options", *options])
    return rc, ""


def stale_lock_file(env: Env) -> bool:
    from minigpt4.common.output_dir import claim_output_dir

    lock_file = env.tmp / "out" / ".lock"
    lock_file.parent.mkdir()
    lock_file.write_text("pid 999999999 on a-node-that-was-killed\n")  # no process holds its flock
    with claim_output_dir(env.tmp / "out", "run.output_dir"):
        assert lock_file.read_text().startswith(f"pid {os.getpid()} on ")
    assert not lock_file.exists()
    return True


def _without(name: str) -> Callable[[Path], None]:
    return lambda root: (root / "step_00000003" / name).unlink()


OUTPUT_CASES = [
    Case("checkpoint/resume/truncated-state-pt",
         partial(resume_past_damage, lambda root: _truncate(root / "step_00000003" / "state.pt"),
                 "{tmp}/run/checkpoints/step_00000003/state.pt is truncated or damaged"),
         Holds("passed over with a warning naming the file; resumed from step 2, the older one keep_last kept")),
    Case("checkpoint/resume/truncated-trainable-safetensors",
         partial(resume_past_damage, lambda root: _truncate(root / "step_00000003" / "trainable.safetensors"),
                 "step_00000003/trainable.safetensors is truncated or damaged (SafetensorError: "),
         Holds("passed over with a warning naming the file; resumed from step 2")),
    Case("checkpoint/resume/state-pt-missing",
         partial(resume_past_damage, _without("state.pt"), "step_00000003 lacks state.pt"),
         Holds("passed over with a warning; resumed from step 2")),
    Case("checkpoint/resume/latest-names-a-deleted-folder",
         partial(resume_past_damage, lambda root: shutil.rmtree(root / "step_00000003"),
                 "latest names 'step_00000003', which is not a checkpoint directory"),
         Holds("passed over with a warning; resumed from step 2")),
    Case("checkpoint/resume/every-checkpoint-damaged", resume_with_every_checkpoint_damaged,
         Raises(CheckpointError, ("no complete checkpoint to resume from in {tmp}/run/checkpoints",
                                  "{tmp}/run/checkpoints/step_00000002/state.pt is truncated or damaged",
                                  "{tmp}/run/checkpoints/step_00000001/state.pt is truncated or damaged"))),
    Case("checkpoint/resume/latest-points-nowhere/train", train_resume_latest_nowhere,
         Exits2(("no complete checkpoint to resume from", "latest names 'step_00000004', which is not a checkpoint "
                 "directory"), prefix="error: ")),
    Case("checkpoint/resume/other-data-order", resume_with_other_data_order,
         Raises(CheckpointError, ("cannot continue {tmp}/run/checkpoints/step_00000002 exactly",
                                  "grad_accum_steps: checkpoint 1, now 2"))),
    Case("checkpoint/resume/fresh-run-over-an-old-one", fresh_run_over_old_run,
         Raises(CheckpointError, ("{tmp}/run already holds checkpoints", "train.py --resume"))),
    Case("output/disk-full/checkpoint", checkpoint_disk_too_full,
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000001: No space left on device",
                                       "it needs about 74.1 KiB (9.8 KiB free there)",
                                       "previous checkpoint (none) is untouched", "run.keep_last"),
                after=_no_half_written_checkpoint)),
    Case("output/disk-full/while-writing-safetensors",
         partial(checkpoint_write_fails, "save_trainable",
                 SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), 2),
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000002: No space left on device",
                                       "needs about", "free there", "previous checkpoint (step_00000001) is untouched"),
                after=_no_half_written_checkpoint)),
    Case("output/read-only/checkpoint",
         partial(checkpoint_write_fails, "_write_torch", OSError(30, "Read-only file system"), 3),
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000003: Read-only file system",
                                       "previous checkpoint (step_00000002) is untouched",
                                       "make {tmp}/run/checkpoints writable"), after=_no_half_written_checkpoint)),
    Case("output/disk-full/train", train_disk_full,
         Exits2(("/out/checkpoints/step_00000001: No space left on device; it needs about", "free there",
                 "continue with train.py --resume"), prefix="error: ")),
    Case("output/read-only/output-folder/train", train_read_only_output_folder,
         Exits2(("cannot write in the output folder", "(run.output_dir): Read-only file system"), prefix="error: ")),
    Case("output/in-use/train", train_into_a_folder_in_use,
         Exits2(("is in use by another run (pid", f"pid {os.getpid()} on ", "choose another run.output_dir"),
                prefix="error: ")),
    Case("output/in-use/evaluate", evaluate_into_a_folder_in_use,
         Exits2(("is in use by another run", f"pid {os.getpid()} on ", "choose another eval.output_dir"),
                prefix="error: ")),
    Case("output/stale-lock-of-a-dead-run", stale_lock_file,
         Holds("taken over: the kernel dropped the dead holder's flock; the file names the new pid, then is removed")),
]
