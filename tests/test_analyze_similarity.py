"""scripts/analyze_similarity.py on a tiny random model: every plot is written, numbers match the demo's."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from minigpt4.common.tiny_models import tiny_model_config
from minigpt4.models.checkpoints import save_trainable, trainable_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    path = os.path.join(ROOT, "scripts", "analyze_similarity.py")
    spec = importlib.util.spec_from_file_location("analyze_similarity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir, tiny_model_factory):
    from omegaconf import OmegaConf

    cfg_path = tmp_path / "tiny.yaml"
    OmegaConf.save({"model": tiny_model_config(tiny_tokenizer_dir, "vib")}, cfg_path)
    compare = tmp_path / "adavib.safetensors"
    other = tiny_model_factory("vib", seed=3)
    save_trainable(compare, trainable_tensors(other))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    Image.new("RGB", (20, 20), "green").save(images / "sub" / "nested.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (images / "readme.txt").write_text("ignored: not an image suffix")
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "ce": 3.0 / (s + 1), "kl_term": 1e-3 * s, "alpha": 0.01 + 0.001 * s,
                         "entropy_ratio": math.exp(-(0.01 + 0.001 * s)), "sigma": None if s == 4 else 0.5,
                         "lr": 1e-4}) for s in range(10)]
    metrics.write_text("\n".join(lines) + "\n\n" + '{"step": 10, "ce": 0.2')  # torn last line: ignored
    return cfg_path, compare, images, metrics


def test_all_plots_written(script, setup, tmp_path):
    cfg_path, compare, images, metrics = setup
    out = tmp_path / "out"
    code = script.main(["--cfg-path", str(cfg_path), "--compare-ckpt", str(compare), "--images", str(images),
                        "--metrics", str(metrics), "--out", str(out), "--num-examples", "3", "--batch-size", "4",
                        "--gpu-id", "-1"])
    assert code == 0
    for name in ("similarity_distribution.png", "entropy_hist.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert len(data) > 5_000 and data[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "similarity_summary.json").read_text())
    assert summary["skipped"] == 1 and len(summary["images"]) == 6 and "nested.jpg" in summary["images"]
    assert summary["curves"] == ["ce", "kl_term", "alpha", "entropy_ratio", "sigma"]
    base, other = summary["projectors"]["base"], summary["projectors"]["adavib.safetensors"]
    assert len(base["entropy_ratio"]) == 6 and base["entropy_ratio"] != other["entropy_ratio"]
    for r, a in zip(base["entropy_ratio"], base["alpha"], strict=True):
        assert 0 < r <= 1 and a == pytest.approx(-math.log(r), rel=1e-5)


def test_numbers_agree_with_the_demo(script, setup, tmp_path, tiny_model_factory):
    """The script's H/log V for an image equals the demo's for the same image and model."""
    from minigpt4.demo.chat import DemoEngine
    from minigpt4.demo.loading import image_processor_for

    cfg_path, _, images, _ = setup
    out = tmp_path / "out"
    assert script.main(["--cfg-path", str(cfg_path), "--images", str(images), "--out", str(out),
                        "--max-images", "2", "--num-examples", "0", "--gpu-id", "-1"]) == 0
    summary = json.loads((out / "similarity_summary.json").read_text())
    assert summary["images"] == ["img0.png"] and summary["skipped"] == 1  # sorted paths: broken.jpg, img0.png
    assert not (out / "similarity_distribution.png").exists() and (out / "entropy_hist.png").stat().st_size > 0
    model = tiny_model_factory("vib", seed=0)  # the script seeds 0 before building, as the factory does
    engine = DemoEngine(model, image_processor_for(model))
    state, _, _ = engine.upload(engine.new_state(), str(images / "img0.png"))
    assert summary["projectors"]["base"]["entropy_ratio"][0] == pytest.approx(
        state.diagnostics["base"].entropy_ratio, rel=1e-5)


def test_metrics_only_and_bad_inputs(script, setup, tmp_path, capsys):
    _, _, images, metrics = setup
    out = tmp_path / "curves"
    assert script.main(["--metrics", str(metrics), "--out", str(out)]) == 0
    assert (out / "training_curves.png").stat().st_size > 5_000 and not (out / "entropy_hist.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "ce": 1.0}\nnot json\n{"step": 2, "ce": 0.5}\n')
    assert script.main(["--metrics", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script.main(["--cfg-path", str(setup[0]), "--images", str(empty), "--out", str(out)]) == 2
    assert "no usable image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--out", str(out)])  # neither --images nor --metrics
