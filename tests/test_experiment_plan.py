"""The experiment's plan for both backbones (minigpt4/shapes/experiment/plan.py) without running it: the real-small
rows and sizes, the matched-β control's β read from its seed's AdaVIB run, and the POPE subset folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _scripts import load_script

from minigpt4.shapes.experiment import plan as shapes_plan
from minigpt4.shapes.world.folder import first_pope_questions


def _experiment():
    return load_script("shapes_experiment")


def test_real_small_plan_trains_the_controls_after_adavib_and_asks_the_stated_sizes(tmp_path, capsys):
    out = tmp_path / "exp"
    assert _experiment().main(["--backbones", "real-small", "--out", str(out), "--data", str(tmp_path / "data"),
                               "--seeds", "0", "1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    trains = re.findall(r"run   train   seed (\d), (.+?) \| .*?--cfg-path (\S+)", printed)
    fine_tunes = ["linear-CE", "VIB fixed β", "AdaVIB", "VIB matched β", "VIB β = 0", "AdaVIB length-free"]
    assert trains == [(seed, name, "train_configs/real_small_adavib.yaml") for seed in "01" for name in fine_tunes]
    matched = [line for line in printed.splitlines() if "train   seed 1, VIB matched β" in line]
    assert matched and f"<mean β·α of the AdaVIB run in {out / 'seed1' / 'adavib'}>" in matched[0]
    evals = [line for line in printed.splitlines() if " eval " in line]
    assert len(evals) == 2 * (2 + 2 * 6)  # two worlds: base, base + VCD, and 6 fine-tunes per seed
    for line in evals:
        assert "--cfg-path eval_configs/real_small_base.yaml" in line
        assert "eval.chair.num_images=100" in line and "eval.pope.splits=[adversarial]" in line
        assert re.search(r"eval\.pope\.dir=\S+/shapes_world_224(_probe)?/pope_first240 ", line)
    assert "model.vib.entropy_of=length_free" in printed and "model.vib.beta=0 " in printed
    assert not out.exists()


def test_the_toy_plan_is_unchanged_by_the_controls():
    assert shapes_plan.BACKBONES["toy"].rows == tuple(
        r for r in shapes_plan.VARIANTS if r not in (shapes_plan.MATCHED, "VIB β = 0", "AdaVIB length-free"))
    assert shapes_plan.needed_fine_tunes(["base", "linear-CE", shapes_plan.MATCHED]) == [
        "linear-CE", "AdaVIB", shapes_plan.MATCHED]  # the control needs its AdaVIB run, trained first


def _run_log(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_matched_beta_is_adavibs_effective_kl_weight_and_a_missing_run_is_an_error(tmp_path):
    run = tmp_path / "seed0" / "adavib"
    matched = shapes_plan.MatchedBeta(run)
    step = shapes_plan.Step("seed 0, VIB matched β", "train", ["python", "train.py", matched], tmp_path / "m", "done")
    assert not step.ready() and not step.reusable()
    with pytest.raises(RuntimeError, match="needs the AdaVIB run of its seed first"):
        step.resolved()
    _run_log(run, [{"step": 1, "kl": 100.0, "kl_term": 2e-3, "alpha": 9.0},  # β·α·KL / KL = 2e-5
                   {"step": 2, "kl": 50.0, "kl_term": 2e-3, "alpha": 30.0},  # 4e-5
                   {"step": 2, "loss": 1.0}])  # a record without the KL (an eval line) does not count
    assert step.ready() and step.resolved() == ["python", "train.py", "model.vib.beta=3e-05"]
    step.out_dir.mkdir()
    (step.out_dir / "done").write_text("")
    (step.out_dir / shapes_plan.STAMP_FILE).write_text(json.dumps(step.stamp()))
    assert step.reusable()
    _run_log(tmp_path / "other", [{"step": 1, "kl": 100.0, "kl_term": 1e-3}])  # AdaVIB ran again, differently
    assert not step._replace(command=["python", "train.py", shapes_plan.MatchedBeta(tmp_path / "other")]).reusable()
    _run_log(tmp_path / "no_kl", [{"step": 1, "loss": 1.0}])
    with pytest.raises(RuntimeError, match="no logged step with kl_term"):
        shapes_plan.MatchedBeta(tmp_path / "no_kl").resolve()


def test_a_finished_step_runs_again_when_a_file_it_names_changed(tmp_path, monkeypatch):
    """Reuse by command line alone lent a table the numbers of a recipe that had since been edited, or of an
    evaluation whose checkpoint had been retrained: the stamp holds the SHA-256 of the files the command names."""
    monkeypatch.chdir(tmp_path)  # the experiment runs from the checkout; its paths are relative to it
    Path("recipe.yaml").write_text("model: {attn_implementation: sdpa}\n")
    Path("run").mkdir()
    Path("run/trainable.safetensors").write_bytes(b"weights v1")
    out_dir = Path("eval")
    command = ["python", "evaluate.py", "--cfg-path", "recipe.yaml",
               "--options", "model.ckpt=run/trainable.safetensors", f"eval.output_dir={out_dir}",
               f"--out={out_dir}/metrics.json", "eval.batch_size=4"]
    step = shapes_plan.Step("base model", "eval", command, out_dir, "metrics.json")
    out_dir.mkdir()
    (out_dir / shapes_plan.STAMP_FILE).write_text(json.dumps(step.stamp()))
    (out_dir / "metrics.json").write_text("{}")  # an output: not an input of the stamp
    assert sorted(step.stamp()["inputs"]) == ["recipe.yaml", "run/trainable.safetensors"]
    assert step.reusable()

    Path("recipe.yaml").write_text("model: {attn_implementation: eager}\n")
    assert not step.reusable()
    Path("recipe.yaml").write_text("model: {attn_implementation: sdpa}\n")
    assert step.reusable()
    Path("run/trainable.safetensors").write_bytes(b"weights v2")  # the model was trained again
    assert not step.reusable()


def test_the_report_names_the_commits_that_produced_the_steps(tmp_path):
    from minigpt4.shapes.experiment.running import step_commits

    steps = []
    made_by = (("a", "1" * 40, False), ("b", "1" * 40, False), ("c", "2" * 40, True), ("d", None, None))
    for name, commit, dirty in made_by:
        steps.append(shapes_plan.Step(name, "eval", ["python", "evaluate.py"], tmp_path / name, "metrics.json"))
        if commit is not None:
            (tmp_path / name).mkdir()
            (tmp_path / name / "provenance.json").write_text(json.dumps({"git": {"commit": commit, "dirty": dirty}}))
    assert step_commits(steps[:2]) == f"Every step was produced by commit {'1' * 12}."
    assert step_commits(steps) == (f"The steps were produced by 2 commits: {'1' * 12} (2 steps); "
                                   f"{'2' * 12} with uncommitted changes (1 step).")
    assert step_commits(steps[3:]) == "No step recorded its commit."


def test_the_pope_subset_holds_the_first_questions_of_each_split(tmp_path):
    world = tmp_path / "world"
    (world / "pope").mkdir(parents=True)
    for split in ("random", "adversarial"):
        (world / "pope" / f"{split}.jsonl").write_text("".join(f'{{"question_id": {i}, "s": "{split}"}}\n'
                                                               for i in range(10)))
    target = first_pope_questions(world, 4)
    assert target == world / "pope_first4"
    for split in ("random", "adversarial"):
        lines = (target / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line)["question_id"] for line in lines] == [0, 1, 2, 3] and split in lines[0]
    with pytest.raises(RuntimeError, match="fewer than the 11 asked"):
        first_pope_questions(world, 11)


def test_the_report_names_each_seeds_matched_beta_from_its_own_command(tmp_path):
    from minigpt4.shapes.experiment.report import matched_beta_text

    for seed, beta in ((0, "2.5e-06"), (1, "3.1e-06")):
        run = tmp_path / f"seed{seed}" / "vib_matched_beta"
        run.mkdir(parents=True)
        (run / shapes_plan.STAMP_FILE).write_text(json.dumps(
            {"command": ["python", "train.py", f"model.vib.beta={beta}"], "inputs": {}}))
    text = matched_beta_text(tmp_path, [0, 1], ["base", "linear-CE", shapes_plan.MATCHED])
    assert "β = 2.5e-06, 3.1e-06 (seed 0, 1)" in text
    assert matched_beta_text(tmp_path, [0, 1], ["base", "linear-CE"]) == ""
