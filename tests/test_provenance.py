"""Reproducibility: provenance records (commit, versions, file hashes, hash cache) and two identical tiny runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt4.common import provenance as prov

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(ROOT / "train_configs" / "tiny_cpu.yaml")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the hash cache goes to ~/.cache/minigpt4


# ------------------------------------------------------------------------------------------------ hashing


def test_hash_cache_hashes_once_and_again_after_a_change(tmp_path):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(os.urandom(3_000))
    cache_file = tmp_path / "home" / ".cache" / "minigpt4" / "sha256.json"

    first = prov.HashCache()
    assert first.path == cache_file
    assert first.sha256(weights) == _sha(weights) and first.hashed_bytes == 3_000
    first.save()
    entry = json.loads(cache_file.read_text())[str(weights.resolve())]
    assert entry == {"size": 3_000, "mtime_ns": weights.stat().st_mtime_ns, "sha256": _sha(weights)}

    second = prov.HashCache()
    assert second.sha256(weights) == _sha(weights) and second.hashed_bytes == 0  # read from the cache

    weights.write_bytes(os.urandom(3_000))  # same size, new content and mtime
    os.utime(weights, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    third = prov.HashCache()
    assert third.sha256(weights) == _sha(weights) != entry["sha256"] and third.hashed_bytes == 3_000


def test_unreadable_cache_is_ignored_and_rewritten(tmp_path):
    cache_file = tmp_path / "cache.json"
    cache_file.write_text("{not json")
    data = tmp_path / "a.json"
    data.write_text("[]")
    cache = prov.HashCache(cache_file)
    assert cache.sha256(data) == _sha(data)
    cache.save()
    assert str(data.resolve()) in json.loads(cache_file.read_text())


def test_weight_folder_hashes_every_file_and_image_folder_is_listed(tmp_path):
    llm = tmp_path / "vicuna-7b"
    (llm / "sub").mkdir(parents=True)
    (llm / "config.json").write_text("{}")
    (llm / "sub" / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 100)
    record = prov.file_record(llm, prov.HashCache(tmp_path / "c.json"))
    assert record["kind"] == "dir" and record["num_files"] == 2
    assert record["files"]["sub/model-00001-of-00002.safetensors"] == {"size": 100, "sha256": _sha(
        llm / "sub" / "model-00001-of-00002.safetensors")}

    images = tmp_path / "train2014"
    images.mkdir()
    for i in range(3):
        (images / f"{i:012d}.jpg").write_bytes(b"x" * (10 + i))
    listed = prov.data_record(images, prov.HashCache(tmp_path / "c.json"))
    assert listed["method"] == "listing" and listed["num_files"] == 3 and "not hashed" in listed["note"]
    lines = "\n".join(f"{i:012d}.jpg\t{10 + i}" for i in range(3))
    assert listed["listing_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    (images / "000000000000.jpg").write_bytes(b"y" * 10)  # same size, other pixels: not detected (documented)
    assert prov.data_record(images, prov.HashCache(tmp_path / "c.json"))["listing_sha256"] == listed["listing_sha256"]
    (images / "000000000003.jpg").write_bytes(b"z")  # an added image is
    assert prov.data_record(images, prov.HashCache(tmp_path / "c.json"))["listing_sha256"] != listed["listing_sha256"]


def test_eval_config_names_the_benchmark_files(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    for name in ("instances_val2014.json", "captions_val2014.json", "person_keypoints_val2014.json"):
        (ann / name).write_text("{}")
    from minigpt4.eval.settings import ChairSettings, EvalSettings, PopeSettings
    from minigpt4.eval.settings import files_to_record as benchmark_files
    from minigpt4.models.loading import files_to_record as weight_files

    model = {"llm_path": "/w/vicuna", "ckpt": "/w/final/trainable.safetensors", "projector_path": None}
    settings = EvalSettings(tasks=["pope", "chair"], image_dir="/data/val2014",
                            pope=PopeSettings(version="coco-2023-08", dir=None, splits=["random", "adversarial"]),
                            chair=ChairSettings(images=None, coco_annotations=str(ann), synonyms=None))
    assert weight_files(model) == {"model.llm_path": "/w/vicuna", "model.ckpt": "/w/final/trainable.safetensors"}
    data = benchmark_files(settings)
    assert data["eval.image_dir"] == "/data/val2014"
    assert data["eval.pope.random"].endswith("pope/coco-2023-08/random.jsonl") and "eval.pope.popular" not in data
    assert Path(data["eval.chair.synonyms"]).name == "chair_synonyms.txt"
    # only the files CHAIR reads, not the rest of the annotations folder
    assert sorted(k for k in data if k.startswith("eval.chair.coco")) == [
        "eval.chair.coco_annotations/captions_val2014.json", "eval.chair.coco_annotations/instances_val2014.json"]


def test_train_config_names_the_dataset_files(tmp_path):
    from minigpt4.datasets.builders import files_to_record as dataset_files

    shards = [tmp_path / f"{i:05d}.tar" for i in range(3)]
    for shard in shards:
        shard.write_bytes(b"tar")
    datasets = {"caption_json": {"ann_path": "/d/caps.json", "image_dir": "/d/images", "on_bad_image": "skip"},
                "cc_sbu_align": {"storage": "/d/cc_sbu_align", "prompt_path": "/d/prompts.txt"},
                "laion": {"shards": str(tmp_path / "{00000..00002}.tar")}}
    assert dataset_files(datasets) == {
        "datasets.caption_json.ann_path": "/d/caps.json", "datasets.caption_json.image_dir": "/d/images",
        "datasets.cc_sbu_align.prompt_path": "/d/prompts.txt",
        "datasets.cc_sbu_align.storage/filter_cap.json": "/d/cc_sbu_align/filter_cap.json",
        "datasets.cc_sbu_align.storage/image": "/d/cc_sbu_align/image",
        "datasets.laion.shards": [str(s) for s in shards]}
    listed = {"shards": dataset_files(datasets)["datasets.laion.shards"]}
    record = prov.run_provenance({}, weight_paths={}, data_paths=listed, cache_path=tmp_path / "c.json")
    assert record["data"]["shards"]["method"] == "listing" and record["data"]["shards"]["num_files"] == 3


def test_git_state_without_git_or_outside_a_repository(tmp_path, monkeypatch):
    outside = prov.git_state(tmp_path)
    assert outside["commit"] is None and outside["reason"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert prov.git_state() == {"commit": None, "dirty": None, "reason": "git is not installed"}


def test_rewriting_keeps_earlier_records(tmp_path):
    data = tmp_path / "captions.json"
    data.write_text("[]")
    from minigpt4.datasets.builders import files_to_record as dataset_files

    cfg = {"datasets": {"caption_json": {"ann_path": str(data)}}}
    files = {"weight_paths": {}, "data_paths": dataset_files(cfg["datasets"])}
    prov.write_provenance(cfg, tmp_path / "run", **files)
    first = json.loads((tmp_path / "run" / "provenance.json").read_text())
    prov.write_provenance(cfg, tmp_path / "run", **files)  # e.g. train.py --resume
    second = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert second["earlier"] == [first] and "earlier" not in first
    assert second["data"]["datasets.caption_json.ann_path"]["sha256"] == _sha(data)


# ----------------------------------------------------------------------------------------- reproducibility


def _prepare_tiny(tmp_path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_tiny", ROOT / "scripts" / "prepare_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.prepare(str(tmp_path / "tiny"), num_train=24, num_val=4)
    return tmp_path / "tiny"


def _train(data: Path, out: Path) -> None:
    import train

    options = [f"model.tokenizer_path={data}/tokenizer",
               f"datasets.caption_json.ann_path={data}/world/train_captions.json",
               f"datasets.caption_json.image_dir={data}/world/images", f"run.output_dir={out}",
               "run.iters_per_epoch=3", "run.log_every=1", "run.progress_bar=false"]
    assert train.main(["--cfg-path", TINY_RECIPE, "--options", *options]) == 0


def test_two_tiny_runs_with_one_seed_are_identical_and_record_their_provenance(tmp_path):
    from minigpt4.runners.metrics import TIMING_FIELDS

    data = _prepare_tiny(tmp_path)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    for out in runs:
        _train(data, out)

    metrics = [[{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
                for line in (out / "metrics.jsonl").read_text().splitlines()] for out in runs]
    assert [row["step"] for row in metrics[0]] == [1, 2, 3]
    assert {"loss", "ce", "kl_term", "alpha", "lr", "grad_norm"} <= set(metrics[0][0])
    assert metrics[0] == metrics[1]
    weights = [load_file(str(out / "final" / "trainable.safetensors")) for out in runs]
    assert sorted(weights[0]) == sorted(weights[1]) and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key

    record = json.loads((runs[1] / "provenance.json").read_text())
    if (ROOT / ".git").exists() and shutil.which("git"):
        assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"]) and isinstance(record["git"]["dirty"], bool)
    else:
        assert record["git"]["commit"] is None and record["git"]["reason"]
    import transformers

    assert record["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["packages"]["transformers"] == transformers.__version__
    assert record["packages"]["python"] and record["platform"]["machine"] and record["device"]["device"] == "cpu"
    tokenizer = record["weights"]["model.tokenizer_path"]
    assert tokenizer["kind"] == "dir" and tokenizer["files"]
    for name, entry in tokenizer["files"].items():
        assert entry["sha256"] == _sha(data / "tokenizer" / name), name
    ann = record["data"]["datasets.caption_json.ann_path"]
    assert ann["sha256"] == _sha(data / "world" / "train_captions.json")
    images = record["data"]["datasets.caption_json.image_dir"]
    assert images["method"] == "listing" and images["num_files"] == len(list((data / "world" / "images").iterdir()))
    assert record["config"]["run"]["seed"] == 42
    first = json.loads((runs[0] / "provenance.json").read_text())
    assert (first["weights"], first["data"]) == (record["weights"], record["data"])  # same inputs, same hashes


def test_evaluate_writes_provenance_with_the_benchmark_hashes(tmp_path, tiny_model_factory, tiny_tokenizer_dir):
    import yaml
    from PIL import Image

    import evaluate
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.checkpoints import save_state_file

    model = tiny_model_factory("linear", seed=1)
    save_state_file(tmp_path / "full.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (30, 30), (9, 90, 200)).save(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    (tmp_path / "pope").mkdir()
    (tmp_path / "pope" / "random.jsonl").write_text("".join(json.dumps(
        {"question_id": q, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": label}) + "\n"
        for q, label in ((1, "yes"), (2, "no"))))
    cfg = {"model": tiny_model_config(tiny_tokenizer_dir, "linear", full_ckpt=str(tmp_path / "full.safetensors")),
           "eval": {"tasks": ["pope"], "output_dir": str(tmp_path / "out"), "image_dir": str(tmp_path / "val2014"),
                    "device": "cpu", "bootstrap": 0, "vis_processor": {"name": "blip2_image_eval", "image_size": 28},
                    "pope": {"dir": str(tmp_path / "pope"), "splits": ["random"], "max_new_tokens": 2}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.main(["--cfg-path", str(tmp_path / "eval.yaml")]) == 0
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["weights"]["model.full_ckpt"]["sha256"] == _sha(tmp_path / "full.safetensors")
    assert record["data"]["eval.pope.random"]["sha256"] == _sha(tmp_path / "pope" / "random.jsonl")
    assert record["data"]["eval.image_dir"]["num_files"] == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["pope"]["n"] == 2


def test_a_refused_run_does_not_rewrite_the_provenance(tmp_path, capsys):
    """An old run without --resume, a --resume with another data order, or a folder in use by another run is
    refused before provenance.json is touched; the accepted resume then adds its record to the history."""
    import train
    from minigpt4.common.output_dir import claim_output_dir

    data = _prepare_tiny(tmp_path)
    out = tmp_path / "run"
    options = [f"model.tokenizer_path={data}/tokenizer",
               f"datasets.caption_json.ann_path={data}/world/train_captions.json",
               f"datasets.caption_json.image_dir={data}/world/images", f"run.output_dir={out}",
               "run.iters_per_epoch=4", "run.log_every=1", "run.progress_bar=false", "run.save_every_steps=1"]
    assert train.main(["--cfg-path", TINY_RECIPE, "--options", *options, "run.max_steps=2"]) == 0
    first = (out / "provenance.json").read_bytes()
    capsys.readouterr()

    refused = {"old run, no --resume": ["--options", *options],
               "other data order": ["--resume", "--options", *options, "run.seed=7"]}
    for why, argv in refused.items():
        assert train.main(["--cfg-path", TINY_RECIPE, *argv]) == 2, why
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (why, err)
        assert (out / "provenance.json").read_bytes() == first, why
    with claim_output_dir(out, "another run"):
        assert train.main(["--cfg-path", TINY_RECIPE, "--resume", "--options", *options]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert (out / "provenance.json").read_bytes() == first

    assert train.main(["--cfg-path", TINY_RECIPE, "--resume", "--options", *options]) == 0
    record = json.loads((out / "provenance.json").read_text())
    assert record["earlier"] == [json.loads(first)]  # the accepted resume is recorded, the refused ones are not
