"""The on-disk encoder-feature cache: hits are exact, stale keys miss, damage is recomputed, eval is unchanged."""
from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.common.files import sha256_file
from minigpt4.eval.benchmark_runs import ImageLoader
from minigpt4.eval.feature_cache import FeatureCache, build_feature_source, encoder_namespace
from minigpt4.eval.plan import plan_tasks
from minigpt4.eval.settings import EvalSettings, PopeSettings
from minigpt4.eval.task_runs import run_pope

PREP = {"name": "blip2_image_eval", "image_size": 28}


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(1, 5):
        path = folder / f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def model(tiny_model_factory):
    m = tiny_model_factory("vib", seed=3).eval()
    with torch.no_grad():  # clear greedy margins: batched / cached answers cannot flip on near-ties
        m.llm.lm_head.weight.mul_(20.0)
    return m


def _source(model, root, prep=PREP):
    return build_feature_source(model, str(root), prep, ImageLoader(EvalSettings(vis_processor=prep)))


def _refuse_encoder(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower ran although every image was cached")

    monkeypatch.setattr(model.encoder, "forward", refuse)


def test_hit_returns_identical_features_without_running_the_encoder(model, images, tmp_path, monkeypatch):
    source = _source(model, tmp_path / "cache")
    first = source(images[0])
    pixels = ImageLoader(EvalSettings(vis_processor=PREP))(images[0])
    assert torch.equal(first, model.encode_images(pixels[None])[0])
    assert source.encoded == 1 and source.cache.stats()["misses"] == 1

    again = _source(model, tmp_path / "cache")  # a later run: new fingerprint computation, same folder
    _refuse_encoder(model, monkeypatch)
    hit = again(images[0])
    assert torch.equal(hit, first) and hit.dtype == first.dtype
    assert again.cache.stats() == {"hits": 1, "misses": 0, "corrupt": 0}


def test_prefill_encodes_each_image_once_in_batches(model, images, tmp_path):
    source = _source(model, tmp_path / "cache")
    calls = []
    model.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    assert source.prefill(images + images[:2], batch_size=3) == 4
    assert calls == [3, 1]
    assert source.prefill(images, batch_size=3) == 0 and calls == [3, 1]


def test_changed_encoder_weights_or_preprocessing_miss(model, images, tmp_path):
    root = tmp_path / "cache"
    source = _source(model, root)
    source(images[0])
    digest = sha256_file(images[0])
    assert source.cache.get(digest) is not None

    bigger = {**PREP, "image_size": 56}
    assert FeatureCache(root, encoder_namespace(model.encoder, bigger)).get(digest) is None
    other_mean = {**PREP, "mean": [0.5, 0.5, 0.5]}
    assert FeatureCache(root, encoder_namespace(model.encoder, other_mean)).get(digest) is None
    with torch.no_grad():
        model.encoder.query_tokens.add_(1e-3)
    assert FeatureCache(root, encoder_namespace(model.encoder, PREP)).get(digest) is None


def test_damaged_entries_are_recomputed_with_a_warning(model, images, tmp_path, caplog):
    source = _source(model, tmp_path / "cache")
    good = [source(p) for p in images[:2]]
    entry0 = source.cache.path_for(sha256_file(images[0]))
    entry1 = source.cache.path_for(sha256_file(images[1]))

    entry0.write_bytes(entry0.read_bytes()[:40])  # torn file
    entry1.write_bytes(b"\x00 not a safetensors file")  # garbage
    fresh = _source(model, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="minigpt4.eval.feature_cache"):
        assert torch.equal(fresh(images[0]), good[0])
        assert torch.equal(fresh(images[1]), good[1])
    assert fresh.cache.stats()["corrupt"] == 2 and fresh.encoded == 2
    assert sum("damaged entry" in r.getMessage() for r in caplog.records) == 2
    # rewritten: a third run reads both without complaint
    third = _source(model, tmp_path / "cache")
    assert torch.equal(third(images[0]), good[0]) and third.cache.stats()["corrupt"] == 0

    # an intact file under the wrong key (e.g. copied by hand) is refused by its metadata
    entry1.write_bytes(third.cache.path_for(sha256_file(images[0])).read_bytes())
    assert third.cache.get(sha256_file(images[1])) is None and third.cache.corrupt == 1


def test_concurrent_writers_never_expose_a_torn_entry(tmp_path):
    cache = FeatureCache(tmp_path / "cache", {"test": 1})
    values = [torch.full((4, 8), float(i)) for i in range(4)]
    stop = threading.Event()
    # An assert or exception inside a thread only becomes a pytest warning: every thread records what went wrong
    # (and the reader what it read), and the main thread asserts on that.
    problems: list[str] = []
    reads: list[int] = []

    def writer(i):
        try:
            for _ in range(25):
                cache.put("same-image", values[i])
        except Exception as err:  # reported below, in the main thread
            problems.append(f"writer {i}: {type(err).__name__}: {err}")

    def read_once():
        got = cache.get("same-image")
        if got is None:
            return
        reads.append(1)
        if not any(torch.equal(got, v) for v in values):
            problems.append(f"reader saw an entry no writer wrote: {got.flatten()[:8].tolist()}")

    def reader():
        try:
            while not stop.is_set():
                read_once()
            read_once()  # once more after every writer has finished: the entry must be there and whole
        except Exception as err:  # reported below, in the main thread
            problems.append(f"reader: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert problems == []
    assert reads, "the reader never read the entry"
    assert cache.corrupt == 0
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix == ".tmp"]
    assert leftovers == []


def test_pope_answers_identical_with_and_without_the_cache(model, images, tmp_path, monkeypatch):
    pope = tmp_path / "pope"
    pope.mkdir()
    with open(pope / "random.jsonl", "w") as f:
        qid = 0
        for path in images:
            for obj in ("dog", "chair", "red ball"):
                qid += 1
                name = path.rsplit("/", 1)[1]
                f.write(json.dumps({"question_id": qid, "image": name, "text": f"Is there a {obj} in the image?",
                                    "label": "yes" if qid % 2 else "no"}) + "\n")

    def settings(out, cache):
        return EvalSettings(image_dir=str(tmp_path / "images"), output_dir=str(out), batch_size=4, device="cpu",
                            bootstrap=0, vis_processor=dict(PREP), feature_cache=cache,
                            pope=PopeSettings(dir=str(pope), splits=["random"], max_new_tokens=4))

    def answers(out):
        return [json.loads(line)["answer"] for line in open(out / "pope_random_answers.jsonl")]

    plain, cached, rerun = tmp_path / "plain", tmp_path / "cached", tmp_path / "rerun"
    base = run_pope(model, plan_tasks(settings(plain, None)), str(plain))
    with_cache = run_pope(model, plan_tasks(settings(cached, str(tmp_path / "fc"))), str(cached))
    assert answers(cached) == answers(plain) and len(answers(plain)) == 12
    assert with_cache["f1"] == base["f1"] and with_cache["accuracy"] == base["accuracy"]
    _refuse_encoder(model, monkeypatch)  # a second evaluation reads every image from the cache
    run_pope(model, plan_tasks(settings(rerun, str(tmp_path / "fc"))), str(rerun))
    assert answers(rerun) == answers(plain)


def _within(seconds: float, fn):
    """fn() in a thread; a hang fails the test after `seconds` (a blocked FIFO reader is then released)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"still running after {seconds} s: the FIFO was opened")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_pope_with_the_cache_refuses_a_fifo_or_device_image_instead_of_hashing_it_forever(
        model, images, tmp_path, kind):
    """Issue 13 item 2: with eval.feature_cache set, the image was hashed before it was checked; a FIFO blocked
    and a link to /dev/zero was read forever. Now it is refused as without the cache: an error naming the file,
    or (on_bad_image: skip) its questions are left out and the rest scored."""
    import os

    from minigpt4.common.images import BadImageError

    special = tmp_path / "images" / "COCO_val2014_000000000009.jpg"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        os.symlink("/dev/zero", special)
    pope = tmp_path / "pope"
    pope.mkdir()
    names = [p.rsplit("/", 1)[1] for p in images[:2]] + [special.name]
    (pope / "random.jsonl").write_text("".join(json.dumps(
        {"question_id": q, "image": name, "text": "Is there a dog in the image?", "label": "yes" if q % 2 else "no"})
        + "\n" for q, name in enumerate(names)))

    def settings(out, on_bad_image):
        return EvalSettings(image_dir=str(tmp_path / "images"), output_dir=str(out), batch_size=2, device="cpu",
                            bootstrap=0, vis_processor=dict(PREP), feature_cache=str(tmp_path / "fc"),
                            on_bad_image=on_bad_image, pope=PopeSettings(dir=str(pope), splits=["random"],
                                                                          max_new_tokens=3))

    with pytest.raises(BadImageError, match=f"{special}: not a regular file"):
        _within(10, lambda: run_pope(model, plan_tasks(settings(tmp_path / "e", "error")), str(tmp_path / "e")))
    skipping = plan_tasks(settings(tmp_path / "s", "skip"))
    result = _within(10, lambda: run_pope(model, skipping, str(tmp_path / "s")))
    assert result["n"] == 2 and result["skipped"]["random"] == {"questions": 1, "images": [special.name]}
