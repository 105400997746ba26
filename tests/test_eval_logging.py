"""evaluate.py's results mirrored to TensorBoard and W&B (offline) as training does: every metric as a scalar and
the per-item outputs as tables, equal to what metrics.json / chair.json / pope.json hold."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from minigpt4.shapes.world.scenes import build_shapes_world

    folder = tmp_path_factory.mktemp("logging_world") / "world"
    build_shapes_world(folder, num_train=2, num_val=4)
    return folder


def _options(world: Path, out: Path) -> list[str]:
    return [f"eval.output_dir={out}", f"eval.image_dir={world}/images", f"eval.pope.dir={world}/pope",
            f"eval.chair.images={world}/val_images.json", f"eval.chair.coco_annotations={world}/annotations",
            f"eval.chair.synonyms={world}/synonyms.txt", "eval.bootstrap=0", "eval.device=cpu"]


class FakeWandb(types.ModuleType):
    """What evaluate.py hands to wandb, recorded (wandb itself is not a dependency of this project)."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged, self.finished = None, [], False
        self.summary = {}

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data


def test_evaluate_mirrors_metrics_and_per_item_tables(world, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import evaluate

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "eval"
    cfg = str(ROOT / "eval_configs" / "shapes_base.yaml")
    monkeypatch.chdir(ROOT)  # the config's model paths are relative to the repository root
    assert evaluate.main(["--cfg-path", cfg, "--options", *_options(world, out), "eval.tensorboard=true",
                          "eval.wandb=true"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    chair = json.loads((out / "chair.json").read_text())

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    scalars = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalars["eval/chair/chair_i"] == pytest.approx(metrics["chair"]["chair_i"])
    assert scalars["eval/pope/mean/accuracy"] == pytest.approx(metrics["pope"]["mean"]["accuracy"])
    assert scalars["eval/pope/adversarial/f1"] == pytest.approx(metrics["pope"]["splits"]["adversarial"]["f1"])
    text = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    captions = text["eval/chair_captions/text_summary"]
    assert captions.count("\n") == 1 + len(chair["per_caption"])  # header, rule, one row per caption
    assert all(row["caption"].replace("|", "&#124;")[:30] in captions for row in chair["per_caption"])
    questions = sum(1 for split in ("random", "popular", "adversarial")
                    for _ in open(world / "pope" / f"{split}.jsonl"))
    assert text["eval/pope_answers/text_summary"].count("\n") == 1 + questions

    assert fake.init_kwargs["mode"] == "offline" and fake.init_kwargs["job_type"] == "eval"
    assert fake.init_kwargs["dir"] == str(out) and fake.init_kwargs["config"]["eval"]["tensorboard"] is True
    (step, logged_scalars), (_, logged_tables) = fake.logged
    assert step == 0 and logged_scalars == pytest.approx(scalars)
    assert len(logged_tables["eval/chair_captions"].data) == len(chair["per_caption"])
    assert logged_tables["eval/pope_answers"].columns[-1] == "answer_label" and fake.finished


def test_a_missing_backend_is_a_config_error_before_any_model(world, tmp_path, monkeypatch, capsys):
    import evaluate
    from minigpt4.eval import eval_logging

    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it raises ImportError
    cfg = str(ROOT / "eval_configs" / "shapes_base.yaml")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval"
    assert evaluate.main(["--cfg-path", cfg, "--options", *_options(world, out), "eval.wandb=true"]) == 2
    err = capsys.readouterr().err
    assert "config error: eval.wandb is true but the `wandb` package is missing: pip install wandb" in err
    assert not (out / "metrics.json").exists()
    assert eval_logging.markdown_table(["a"], [["x|y\nz"]]) == "| a |\n|---|\n| x&#124;y z |"
