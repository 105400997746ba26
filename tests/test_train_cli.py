"""train.py: config validation before any model is built, and the tiny recipe end to end."""
import json
import os

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "train_configs/tiny_cpu.yaml")


def _prepare(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_tiny", os.path.join(ROOT, "scripts/prepare_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prepare(str(tmp_path / "tiny"), num_train=24, num_val=4)
    d = tmp_path / "tiny"
    return [f"model.tokenizer_path={d}/tokenizer", f"datasets.caption_json.ann_path={d}/world/train_captions.json",
            f"datasets.caption_json.image_dir={d}/world/images", f"run.output_dir={tmp_path}/out"]


@pytest.mark.parametrize("option, named", [
    ("run.bogus=1", "unknown key 'run.bogus'"),  # the valid keys are listed, as for model.*
    ("model.bogus=1", "model.bogus"),
    ("model.vib.bogus=1", "model.vib.bogus"),
    ("datasets.caption_json.bogus=1", "bogus"),
    ("run.batch_size=abc", "batch_size"),
    ("model.num_query_tokens=abc", "model.num_query_tokens"),
    ("model.mm_projector_type=mlp", "model.mm_projector_type"),
    ("model.llm_path=/no/such/vicuna", "model.llm_path"),
    ("datasets.caption_json.ann_path=/no/such.json", "datasets.caption_json.ann_path"),
])
def test_config_errors_name_the_key(tmp_path, capsys, option, named):
    options = _prepare(tmp_path)
    assert train.main(["--cfg-path", TINY, "--options", *options, option]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and named in err
    assert not (tmp_path / "out").exists()  # stopped before any model or output was made


def test_unknown_key_lists_valid_keys(tmp_path, capsys):
    assert train.main(["--cfg-path", TINY, "--options", *_prepare(tmp_path), "model.vit_pth=x"]) == 2
    assert "vit_path" in capsys.readouterr().err  # the valid keys are listed


def test_recipe_without_weights_names_what_to_set(capsys):
    assert train.main(["--cfg-path", os.path.join(ROOT, "train_configs/adavib_minigpt4_7b.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.encoder_path" in err and "datasets.caption_json.ann_path" in err


def test_tiny_recipe_trains_end_to_end(tmp_path):
    # 24 images x 3 captions = 72 samples; batch 4 x accumulation 2 -> 9 optimizer steps in the epoch
    options = _prepare(tmp_path) + ["run.log_every=1", "run.save_every_steps=4"]
    assert train.main(["--cfg-path", TINY, "--options", *options]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    for key in ("loss", "ce", "kl_term", "alpha", "entropy_ratio", "sigma", "lr", "samples_per_s"):
        assert key in rows[0], key
    assert (out / "final" / "trainable.safetensors").exists()


def test_tiny_recipe_under_torchrun_two_processes(tmp_path):
    """2 ranks (gloo): the run finishes (every checkpoint verifies that both ranks hold identical projector
    weights, or raises), and only rank 0 writes: one metrics line per step, one checkpoint set."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    options = _prepare(tmp_path) + ["run.max_steps=4", "run.log_every=1", "run.save_every_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), "--cfg-path", TINY, "--options", *options],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]
    weights = load_file(str(out / "checkpoints" / "step_00000004" / "trainable.safetensors"))
    assert weights and all(k.startswith("projector.") for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]  # nothing written elsewhere


def test_checkpoint_refuses_diverged_replicas(monkeypatch):
    """The sync check behind the torchrun test can fail: two ranks reporting different weights abort."""
    from types import SimpleNamespace

    from minigpt4.runners import runner as runner_mod

    fake = SimpleNamespace(global_step=7, model=torch.nn.Linear(2, 2))
    monkeypatch.setattr(runner_mod.dist, "all_gather_object", lambda obj: [obj, (obj[0], "something-else")])
    with pytest.raises(RuntimeError, match="differ between ranks at step 7"):
        runner_mod.Runner._save(fake)


def test_bad_weight_file_is_one_line_error_not_traceback(tmp_path, capsys):
    """A checkpoint problem found while building the model ends like a config error: exit 2, named file."""
    bad = tmp_path / "projector.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(5120, 32), "llama_proj.bias": torch.zeros(5120)}}, bad)
    assert train.main(["--cfg-path", TINY, "--options", *_prepare(tmp_path), f"model.projector_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "5120" in err and "Traceback" not in err


def test_resume_into_another_projector_type_is_one_line_error(tmp_path, capsys):
    """The resume checks its trainable.safetensors as every loader does (models/checkpoints.py): a VIB
    checkpoint resumed as a linear model ends in one line naming the file and the fix, exit 2."""
    options = _prepare(tmp_path) + ["run.max_steps=2", "run.save_every_steps=1"]
    assert train.main(["--cfg-path", TINY, "--options", *options]) == 0
    capsys.readouterr()
    assert train.main(["--cfg-path", TINY, "--resume", "--options", *options, "model.mm_projector_type=linear"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load trainable weights from ") and err.count("\n") == 1, err
    assert "step_00000002/trainable.safetensors" in err and "key(s) the model does not have" in err
    assert "the file holds a VIB projector" in err and "model.mm_projector_type: vib" in err


def test_two_runs_started_into_one_folder_at_once_exactly_one_runs(tmp_path):
    """Both start at the same moment. The lock on run.output_dir (taken before the model is built, held until the
    run ends) lets exactly one through; the other stops with one line naming the folder and the pid holding it.
    The runs are long (1000 epochs), so the refused one meets the lock however late it starts; the one that runs
    is then preempted with SIGTERM (a checkpoint and exit 0)."""
    import signal
    import subprocess
    import sys
    import time

    options = _prepare(tmp_path) + ["run.max_epoch=1000", "run.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--cfg-path", TINY, "--options", *options]
    logs = [tmp_path / f"stderr{i}.txt" for i in range(2)]
    handles = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=handle)
             for handle in handles]
    metrics = tmp_path / "out" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        while time.time() < deadline and procs[winner].poll() is None and not metrics.is_file():
            time.sleep(0.1)  # SIGTERM only once it trains (its handler is installed then)
        procs[winner].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for handle in handles:
            handle.close()
    errors = [log.read_text() for log in logs]
    assert (codes[winner], codes[loser]) == (0, 2), errors
    refusal = errors[loser].strip().splitlines()
    assert "Traceback" not in errors[loser] and refusal[-1].startswith("error: the output folder "), refusal
    assert f"{tmp_path}/out is in use by another run (pid {procs[winner].pid} on " in refusal[-1]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
    assert "earlier" not in json.loads((tmp_path / "out" / "provenance.json").read_text())  # written once
    assert not (tmp_path / "out" / ".lock").exists()  # released at the end
