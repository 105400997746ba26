"""train.py: config validation before any model is built, and the tiny recipe end to end."""
import json
import os

import pytest

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
    ("run.bogus=1", "unknown run.* key(s): bogus"),
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
