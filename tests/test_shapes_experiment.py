"""The shapes-world AdaVIB experiment: projector-only fine-tuning from the committed base model, the
co-occurrence probe world, the paired bootstrap, and the experiment script end to end on a tiny world."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt4.eval.paired import chair_counts, compare_eval_dirs, paired_difference
from minigpt4.shapes.world.scenes import COOCCURRENCE_PAIRS, build_shapes_world

ROOT = Path(__file__).resolve().parents[1]
BASE_CKPT = ROOT / "assets" / "shapes_base" / "model.safetensors"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_worlds(tmp_path_factory) -> Path:
    """The experiment's two worlds (seed 0; val co-occurrence 0.9 and 0.0) at a few dozen images."""
    data = tmp_path_factory.mktemp("shapes_data")
    build_shapes_world(data / "shapes_world", num_train=48, num_val=6)
    build_shapes_world(data / "shapes_world_probe", num_train=48, num_val=6, val_cooccurrence=0.0)
    return data


def test_probe_world_shares_the_train_split_and_never_pairs_in_val(small_worlds):
    iid, probe = small_worlds / "shapes_world", small_worlds / "shapes_world_probe"
    for name in ("train_captions.json", "annotations/instances_train2014.json"):
        assert (iid / name).read_bytes() == (probe / name).read_bytes()
    assert (iid / "images/000000000001.jpg").read_bytes() == (probe / "images/000000000001.jpg").read_bytes()
    big = small_worlds / "big_probe"
    build_shapes_world(big, num_train=1, num_val=300, val_cooccurrence=0.0)
    instances = json.loads((big / "annotations/instances_val2014.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present: dict[int, set[str]] = {}
    for ann in instances["annotations"]:
        present.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    anchors = sum(anchor in p for p in present.values() for anchor, _ in COOCCURRENCE_PAIRS)
    assert anchors > 30  # the probe has many traps ...
    assert not any(anchor in p and partner in p for p in present.values() for anchor, partner in COOCCURRENCE_PAIRS)
    assert json.loads((big / "meta.json").read_text())["params"]["val_cooccurrence"] == 0.0
    with pytest.raises(ValueError, match="val_cooccurrence"):
        build_shapes_world(small_worlds / "bad", val_cooccurrence=1.5)


def test_shapes_qa_builder_validates_its_options(small_worlds):
    from minigpt4.datasets.builders import build_train_dataset

    root = str(small_worlds / "shapes_world")
    dataset, collate = build_train_dataset({"shapes_qa": {"root": root, "question_fraction": 0.5}}, seed=3)
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["instruction"]) == 2
    with pytest.raises(ValueError, match=r"datasets\.shapes_qa\.vis_processor"):
        build_train_dataset({"shapes_qa": {"root": root, "vis_processor": {"name": "blip2_image_train"}}})
    with pytest.raises(ValueError, match=r"datasets\.shapes_qa\.splt: unknown option"):
        build_train_dataset({"shapes_qa": {"root": root, "splt": "val"}})
    with pytest.raises(ValueError, match=r"datasets\.shapes_qa\.root"):
        build_train_dataset({"shapes_qa": {"root": str(small_worlds / "missing")}})


def test_adavib_finetune_from_the_base_model_changes_only_the_projector(small_worlds, tmp_path):
    """train_configs/shapes_adavib.yaml for 3 steps: only projector tensors are saved, and the model they
    make holds the base model's encoder and LLM bit for bit, with a changed mean head."""
    import train
    from minigpt4.models.checkpoints import load_state_file
    from minigpt4.models.from_config import build_model

    out = tmp_path / "run"
    assert train.main(["--cfg-path", str(ROOT / "train_configs" / "shapes_adavib.yaml"), "--options",
                       f"datasets.shapes_qa.root={small_worlds / 'shapes_world'}", f"run.output_dir={out}",
                       "run.batch_size=16", "run.log_every=1",
                       f"model.tokenizer_path={ROOT / 'assets/shapes_base/tokenizer'}",
                       f"model.full_ckpt={BASE_CKPT}"]) == 0
    trained = load_state_file(out / "final" / "trainable.safetensors")
    assert {k.split(".")[0] for k in trained} == {"projector"}
    assert {"projector.llama_proj.weight", "projector.llama_proj_std.weight", "projector.mu_p",
            "projector.std_p"} <= set(trained)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["kl"]) and m["alpha"] >= 0 for m in metrics if "kl" in m)

    base = load_state_file(BASE_CKPT)
    model = build_model({
        **_eval_model_section(), "mm_projector_type": "vib", "ckpt": str(out / "final" / "trainable.safetensors")})
    state = model.state_dict()
    for key, value in base.items():
        if key.startswith("projector."):
            continue
        assert torch.equal(state[key], value.float()), key
    assert not torch.equal(state["projector.llama_proj.weight"], base["projector.llama_proj.weight"].float())
    assert torch.equal(state["projector.llama_proj.weight"], trained["projector.llama_proj.weight"])


def _eval_model_section() -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "assets" / "shapes_base" / "model.yaml").read_text())["model"]
    return {**cfg, "tokenizer_path": str(ROOT / cfg["tokenizer_path"]), "full_ckpt": str(ROOT / cfg["full_ckpt"])}


def _chair_rows(hallucinations: list[int]) -> dict:
    """A scored-CHAIR-like result: image i mentions circle (present) plus `hallucinations[i]` absent stars."""
    return {"per_caption": [{"image_id": i + 1, "ground_truth": ["circle"], "mentions": ["circle"] + ["star"] * h,
                             "hallucinated": ["star"] * h} for i, h in enumerate(hallucinations)]}


def test_paired_difference_is_exact_at_the_point_and_zero_for_identical_models():
    a = {"chair": chair_counts(_chair_rows([0, 1, 0, 2, 0, 0, 1, 0]))}
    same = paired_difference(a, a, n_resamples=200)
    assert all(r["diff"] == 0.0 and r["ci"] == [0.0, 0.0] for r in same.values())
    b = {"chair": chair_counts(_chair_rows([0, 0, 0, 2, 0, 0, 0, 0]))}
    result = paired_difference(a, b, n_resamples=500)
    assert result["chair_i"]["a"] == pytest.approx(4 / 12) and result["chair_i"]["b"] == pytest.approx(2 / 10)
    assert result["chair_i"]["diff"] == pytest.approx(2 / 10 - 4 / 12)
    low, high = result["chair_i"]["ci"]
    assert low <= result["chair_i"]["diff"] <= high <= 0.0  # B never hallucinates more on any image
    assert result["recall"]["diff"] == 0.0
    c = {"chair": chair_counts(_chair_rows([0, 0, 0]))}
    with pytest.raises(ValueError, match="different images"):
        paired_difference(a, c)


def test_progress_line_is_redrawn_in_place_on_a_terminal(monkeypatch):
    import io

    from minigpt4.shapes.experiment import running as experiment

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    line = experiment.LiveLine("  [2/5]   │ ", stream=screen)
    line.show("train:  10%|#         | 1/10")
    monkeypatch.setattr(experiment.time, "perf_counter", lambda: 1e9)  # later than the 0.2 s redraw interval
    line.show("train:  20%|##        | 2/10\n")
    line.close()
    assert screen.getvalue() == ("\r\x1b[K  [2/5]   │ train:  10%|#         | 1/10"
                                 "\r\x1b[K  [2/5]   │ train:  20%|##        | 2/10\r\x1b[K")


def test_experiment_script_end_to_end_on_a_tiny_world(small_worlds, tmp_path, capsys, monkeypatch):
    """The README's experiment on 48 train / 6 val images: the default plan in full (--dry-run), then a run of
    the base model, linear-CE, AdaVIB and AdaVIB + VCD on the probe world with POPE's random split alone: every
    step runs, the report has every model with its Figure-1 correlation, and a rerun with a second seed reuses
    every step."""
    monkeypatch.chdir(ROOT)  # the script moves there itself; this restores the directory afterwards
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from minigpt4.shapes.experiment import plan as shapes_plan
    from minigpt4.shapes.experiment import running

    experiment = _script("shapes_experiment")
    monkeypatch.setattr(shapes_plan, "WORLD_ARGS", {"num_train": 48, "num_val": 6})  # as small_worlds built them
    monkeypatch.setattr(running, "PLAIN_EVERY_S", 0.0)  # no terminal here: show every progress line
    out = tmp_path / "exp"
    common = ["--data", str(small_worlds), "--out", str(out), "--train-options", "run.batch_size=24",
              "run.log_every=1"]
    # The default plan: base (greedy, VCD, VCD's α = 0 control, OPERA), then per fine-tune its training and its two
    # evaluations (AdaVIB's greedy, then VCD, then OPERA), then Figure 1 per world.
    assert experiment.main(common + ["--dry-run"]) == 0
    plan = re.findall(r"^  \[\d+/23\] run   (\w+) +(.+?) \| \S+ (\S+)", capsys.readouterr().out, re.M)
    fine_tunes = ("linear-CE", "VIB fixed β", "AdaVIB")
    assert plan == ([("eval", "base model", "evaluate.py")] * 2 + [("eval", "base + VCD", "evaluate.py")] * 2
                    + [("eval", "base + VCD α=0", "evaluate.py")] * 2 + [("eval", "base + OPERA", "evaluate.py")] * 2
                    + [step for v in fine_tunes for step in [("train", f"seed 0, {v}", "train.py")]
                       + [("eval", f"seed 0, {v}", "evaluate.py")] * 2]
                    + [("eval", "seed 0, AdaVIB + VCD", "evaluate.py")] * 2
                    + [("eval", "seed 0, AdaVIB + OPERA", "evaluate.py")] * 2
                    + [("entropy", "Figure 1: H/log V of the visual tokens", "scripts/visual_entropy.py")] * 2)
    assert not out.exists()  # a dry run runs nothing
    probe = ["--worlds", "co_occurrence_probe", "--eval-options", "eval.pope.splits=[random]"]
    assert experiment.main(common + probe + ["--variants", "AdaVIB", "AdaVIB + VCD"]) == 0
    printed = capsys.readouterr().out
    # Where the run stands: step k of N with the elapsed time and what is left, after every step ...
    assert "plan: 7 steps (7 to run, 0 finished before and reused)" in printed  # base, 2 × (train, eval), VCD, Fig. 1
    done = re.findall(r"^  \[(\d+)/7\] done   (train|eval|entropy) in \d+ s · elapsed \d+:\d\d · (.*)$", printed,
                      re.M)
    assert [(int(k), kind) for k, kind, _ in done] == list(enumerate(
        ["eval", "train", "eval", "train", "eval", "eval", "entropy"], start=1))
    assert done[0][2].endswith("left (6 steps)")
    assert all(re.fullmatch(r"about \d+:\d\d left \(\d+ steps?\)", left) for _, _, left in done[:-1])
    assert done[-1][2] == "nothing left"
    # ... each step's own progress line as it runs (here the tqdm bars of training and generation) ...
    assert re.search(r"^  \[2/7\]   │ train: +\d+%", printed, re.M)
    assert re.search(r"^  \[1/7\]   │ .*\d+/\d+", printed, re.M)
    # ... and the full output of every step in its log file.
    assert "train: 100%" in (out / "seed0" / "linear_ce.train.log").read_text()
    report = (out / "results.md").read_text()
    for row in ("| base |", "| linear-CE |", "| AdaVIB |", "| AdaVIB + VCD |", "co-occurrence probe val"):
        assert row in report
    assert "Backbones: toy (train_configs/shapes_adavib.yaml, eval_configs/shapes_base.yaml)" in report
    # Each train / evaluate step recorded its commit; one checkout made them all (its dirty flag rides along).
    assert re.search(r"Every step was produced by commit (unknown|[0-9a-f]{12})( with uncommitted changes)?\.", report)
    # The VCD row decoded with VCD (its label names the source's parameters), from AdaVIB's own fine-tune.
    vcd_metrics = json.loads((out / "seed0/adavib/eval_adavib_vcd_co_occurrence_probe/metrics.json").read_text())
    assert "+vcd(α=1,β=0.1,t=500,sample)" in vcd_metrics["protocols"]["chair"]["label"]
    assert "+vcd(α=1,β=0.2,t=500,sample)" in vcd_metrics["protocols"]["pope"]["label"]
    greedy_metrics = json.loads((out / "seed0/adavib/eval_co_occurrence_probe/metrics.json").read_text())
    assert "vcd" not in greedy_metrics["protocols"]["chair"]["label"]
    assert "in-distribution val" not in report and "| VIB fixed β |" not in report
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["worlds"]) == {"co-occurrence probe"}
    diffs = summary["worlds"]["co-occurrence probe"]["paired_differences_to_linear_ce"]
    assert set(diffs) == {"base", "AdaVIB", "AdaVIB + VCD"} and "pope random accuracy" in diffs["AdaVIB"][0]
    assert "pope popular accuracy" not in diffs["AdaVIB"][0]  # not evaluated: its cells say "–"
    assert re.search(r"^\| AdaVIB \|([^|]*\|){5} – \| – \|", report, re.M)  # POPE pop / adv acc
    assert compare_eval_dirs(out / "seed0/adavib/eval_co_occurrence_probe",
                             out / "seed0/adavib/eval_co_occurrence_probe")["chair_i"]["diff"] == 0.0
    probe_world = small_worlds / "shapes_world_probe"
    _check_figure1(shapes_plan, out, probe_world, summary["worlds"]["co-occurrence probe"]["figure1"], report,
                   summary["figure1_finding"])
    capsys.readouterr()
    # Two seeds, linear-CE alone: seed 0's steps are reused, seed 1 and Figure 1 run, the report turns into mean ± std.
    assert experiment.main(common + probe + ["--seeds", "0", "1", "--variants", "linear-CE"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^  \[\d+/6\] reuse ", printed, re.M)) == 3
    assert len(re.findall(r"^  \[\d+/6\] run ", printed, re.M)) == 3
    report = (out / "results.md").read_text()
    assert "mean ± std over seeds [0, 1]" in report and "| AdaVIB |" not in report
    summary = json.loads((out / "results.json").read_text())
    world = summary["worlds"]["co-occurrence probe"]
    assert len(world["paired_differences_to_linear_ce"]["base"]) == 2
    assert [r["seed"] for r in world["figure1"]["by_model"]["linear-CE"]] == [0, 1]
    _check_figure1(shapes_plan, out, probe_world, world["figure1"], report, summary["figure1_finding"])
    # The visual-token readout beside the model's own trap counts (scripts/partner_readout.py).
    readout_json = tmp_path / "readout.json"
    assert _script("partner_readout").main([
        "--train", str(small_worlds / "shapes_world"), "--probe", str(small_worlds / "shapes_world_probe"),
        "--answers", str(out / "base" / "eval_co_occurrence_probe"), "--out", str(readout_json)]) == 0
    readout = json.loads(readout_json.read_text())
    assert set(readout) == {partner for _, partner in COOCCURRENCE_PAIRS}
    for r in readout.values():
        assert 0 <= r["readout_present_on_traps"] <= r["traps"] == r["model"]["caption_traps"]
    # A world folder holding another build is refused, naming what differs, instead of being reused.
    with pytest.raises(RuntimeError, match="val_cooccurrence: 0.9 instead of 0.0"):
        shapes_plan.ensure_shapes_world(small_worlds / "shapes_world", 0.0, shapes_plan.WORLD_ARGS)


def _check_figure1(experiment, out: Path, world: Path, figure1: dict, report: str, finding: str) -> None:
    """The Figure-1 numbers: H/log V as vib.py computes it on the model evaluate.py builds, joined to each
    row's own CHAIR captions, and the report's text made from them."""
    import math

    from minigpt4.common.images import load_rgb
    from minigpt4.eval import entropy_correlation as fig1
    from minigpt4.models.from_config import build_model
    from minigpt4.models.vib import pool_tokens, similarity_entropy
    from minigpt4.processors.image import build_image_processor

    entropy = json.loads(Path(figure1["entropy_file"]).read_text())
    base = entropy["models"]["base"]["entropy_ratio"]
    assert len(entropy["images"]) == len(base) == 6 and all(0.0 < r <= 1.0 for r in base)
    model = build_model(_eval_model_section()).eval()
    image = build_image_processor({"name": "blip2_image_eval", "image_size": 64})(
        load_rgb(world / "images" / f"{int(entropy['images'][2]):0>12}.jpg"))
    with torch.no_grad():
        tokens, _ = model.project(model.encode_images(image[None]))
        expected = similarity_entropy(pool_tokens(tokens), model.embed_weight) / math.log(model.embed_weight.shape[0])
    assert base[2] == pytest.approx(float(expected), abs=1e-6)
    assert entropy["models"]["seed 0, linear-CE"]["entropy_ratio"] != base  # its own fine-tuned projector
    for row, results in figure1["by_model"].items():
        for result in results:
            fine_tune = experiment.VARIANTS[row][0]  # a row with options of its own evaluates its fine-tune's model
            run_dir = out / "base" if fine_tune is None else out / f"seed{result['seed']}" / experiment.slug(fine_tune)
            folder = "eval_co_occurrence_probe" if row == (fine_tune or "base") else \
                f"eval_{experiment.slug(row)}_co_occurrence_probe"
            assert result["eval_dir"] == str(run_dir / folder)
            chair = json.loads((run_dir / folder / "chair.json").read_text())
            assert result["n_hallucinated"] == chair["n_hallucinated_captions"] and result["n_captions"] == 6
            by_image = dict(zip(entropy["images"], entropy["models"][result["model"]]["entropy_ratio"]))
            again = fig1.entropy_hallucination_correlation(*fig1.caption_rows(chair, by_image))
            assert again["spearman"] == result["spearman"] and again["auc"] == result["auc"]
            assert fig1.verdict(result) in report
    assert finding in report and (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_without_arguments_uses_the_embedded_base_model(tmp_path, monkeypatch):
    """`python evaluate.py` alone: the shapes-world base model on a world it generates when missing."""
    import evaluate
    import minigpt4.shapes.world.scenes as shapes_world

    world = tmp_path / "world"
    monkeypatch.setattr(evaluate, "DEFAULT_WORLD", world)
    monkeypatch.chdir(tmp_path)  # evaluate.py moves to the repository root itself
    real_build = shapes_world.build_shapes_world
    monkeypatch.setattr(shapes_world, "build_shapes_world", lambda out: real_build(out, num_train=2, num_val=3))
    out = tmp_path / "eval"
    assert evaluate.main(["--options", f"eval.output_dir={out}", f"eval.image_dir={world}/images",
                          f"eval.pope.dir={world}/pope", f"eval.chair.images={world}/val_images.json",
                          f"eval.chair.coco_annotations={world}/annotations",
                          f"eval.chair.synonyms={world}/synonyms.txt",
                          "eval.bootstrap=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "shapes-base" and metrics["chair"]["n_captions"] == 3
    assert (world / "meta.json").is_file()
    assert Path.cwd() == ROOT
