"""The committed shapes-world base model (assets/shapes_base): it loads through the config, and it captions
shapes-world images it never saw with high object recall by the real CHAIR scorer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _model_checks import caption_recall_on_val

from minigpt4.eval.pope import answer_to_label
from minigpt4.shapes.world.qa import (
    CAPTION_INSTRUCTION,
    ShapesQADataset,
    no_answer,
    object_question,
    yes_answer,
)
from minigpt4.shapes.world.scenes import CLASS_NAMES, build_shapes_world

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "shapes_base"


def _model_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["model"]


def _absolute(cfg: dict) -> dict:
    """model.yaml's paths are relative to the repository root; tests may run from anywhere."""
    return {**cfg, **{k: str(ROOT / cfg[k]) for k in ("tokenizer_path", "full_ckpt")}}


@pytest.fixture(scope="module")
def base_model():
    from minigpt4.models.from_config import build_model

    return build_model(_absolute(_model_section(ASSET / "model.yaml"))).eval()


@pytest.fixture(scope="module")
def unseen_world(tmp_path_factory) -> Path:
    """Fresh val images from another seed: same generator parameters as the training world, never trained on."""
    out = tmp_path_factory.mktemp("shapes_unseen")
    build_shapes_world(out, num_train=1, num_val=40, seed=20240611, image_size=64, cooccurrence=0.9)
    return out


def test_model_yaml_paths_are_repo_relative_and_match_the_eval_config():
    cfg = _model_section(ASSET / "model.yaml")
    assert cfg["full_ckpt"] == "assets/shapes_base/model.safetensors"
    assert cfg["tokenizer_path"] == "assets/shapes_base/tokenizer"
    assert _model_section(ROOT / "eval_configs" / "shapes_base.yaml") == cfg


def test_base_model_loads_in_fp32_with_every_weight_from_the_file(base_model):
    from minigpt4.models.checkpoints import load_state_file

    state = load_state_file(ASSET / "model.safetensors")
    assert {k.split(".", 1)[0] for k in state} == {"encoder", "llm", "projector"}
    assert set(state) == set(base_model.state_dict())
    params = dict(base_model.named_parameters())
    for key in ("projector.llama_proj.weight", "llm.model.embed_tokens.weight", "encoder.query_tokens"):
        assert params[key].dtype == torch.float32
        assert torch.equal(params[key], state[key].float())  # loaded, not the random init
    assert base_model.encoder.vision_config.image_size == 64


def test_base_model_captions_unseen_images_with_high_recall(base_model, unseen_world):
    result = caption_recall_on_val(base_model, unseen_world, image_size=64)
    assert result["recall"] >= 0.8, result["per_caption"][:5]
    assert result["mean_length"] > 4


def test_base_model_answers_object_questions_in_a_form_pope_reads(base_model, unseen_world):
    val = ShapesQADataset(unseen_world, "val", image_size=64)
    prompts, labels = [], []
    for present in val.present[:20]:
        absent = next(c for c in reversed(CLASS_NAMES) if c not in present)
        prompts += [base_model.template.prompt(object_question(present[0])),
                    base_model.template.prompt(object_question(absent))]
        labels += ["yes", "no"]
    images = val.images(range(20)).repeat_interleave(2, dim=0)
    answers = base_model.generate(prompts, images, max_new_tokens=10)
    assert all(a.startswith(("Yes, there is", "No, there is no")) for a in answers), answers
    predicted = [answer_to_label(a) for a in answers]
    assert sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels) >= 0.75


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_training_answers_parse_as_intended_by_the_pope_reference_rule(name):
    assert answer_to_label(yes_answer(name)) == "yes"
    assert answer_to_label(no_answer(name)) == "no"
    assert object_question(name) in {f"Is there a {name} in the image?", f"Is there an {name} in the image?"}


def test_question_mix_is_balanced_and_deterministic(unseen_world):
    a = ShapesQADataset(unseen_world, "val", image_size=64, question_fraction=1.0, seed=3)
    b = ShapesQADataset(unseen_world, "val", image_size=64, question_fraction=1.0, seed=3)
    texts = []
    for epoch in range(10):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            assert a.example_text(i) == b.example_text(i)
            texts.append((i, *a.example_text(i)))
    yes = [(i, q) for i, q, ans in texts if ans.startswith("Yes")]
    assert 0.4 < len(yes) / len(texts) < 0.6
    for i, question, answer in texts:  # yes exactly for the classes in the image
        name = answer.rstrip(".").split()[-1]
        assert question == object_question(name)
        assert (name in a.present[i]) == answer.startswith("Yes")
    captions = ShapesQADataset(unseen_world, "val", image_size=64, question_fraction=0.0)
    assert all(captions.example_text(i)[0] == CAPTION_INSTRUCTION for i in range(len(captions)))


def test_training_script_runs_end_to_end_and_writes_a_loadable_model(tmp_path, monkeypatch):
    """A few steps of scripts/train_shapes_base.py on a tiny world: everything it writes rebuilds the model."""
    import importlib.util

    from minigpt4.models.checkpoints import load_state_file
    from minigpt4.models.from_config import build_model
    from minigpt4.shapes.experiment import base_model

    spec = importlib.util.spec_from_file_location("train_shapes_base", ROOT / "scripts" / "train_shapes_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(base_model, "TRAIN_WORLD", dict(base_model.TRAIN_WORLD, num_train=24, num_val=4))
    out = tmp_path / "model"
    assert script.main(["--data", str(tmp_path / "world"), "--out", str(out), "--steps", "3", "--warmup", "1",
                        "--batch-size", "8", "--val-images", "4"]) == 0
    cfg = _model_section(out / "model.yaml")
    assert cfg["full_ckpt"] == str((out / "model.safetensors").resolve())  # outside the repo: absolute
    model = build_model(cfg)
    state = load_state_file(cfg["full_ckpt"])
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert torch.equal(model.state_dict()["projector.llama_proj.weight"], state["projector.llama_proj.weight"].float())
    # The object probe helped training only; it is not part of the saved model.
    assert {k.split(".", 1)[0] for k in state} == {"encoder", "llm", "projector"}
    log = json.loads((out / "train_log.json").read_text())
    assert log["args"]["steps"] == 3 and 0.0 <= log["quick_val"]["recall"] <= 1.0

    # A world built with other parameters is refused, naming the difference.
    monkeypatch.setattr(base_model, "TRAIN_WORLD", dict(base_model.TRAIN_WORLD, cooccurrence=0.5))
    with pytest.raises(SystemExit, match="cooccurrence"):
        script.main(["--data", str(tmp_path / "world"), "--out", str(out), "--steps", "1", "--warmup", "0"])
