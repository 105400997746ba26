"""Image loading edge cases, caption datasets, webdataset shards, ratio mixing, builders and config checks."""
from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from minigpt4.common.images import BadImageError, load_rgb
from minigpt4.datasets.builders import (
    DATASET_OPTION_KEYS,
    REQUIRED_PATH_KEYS,
    CaptionConcatDataset,
    build_train_dataset,
    validate_dataset_cfg,
)
from minigpt4.datasets.caption import CaptionJsonDataset, PromptPerBatchCollate, collate_samples
from minigpt4.datasets.webdata import WebCaptionDataset, mix_by_ratio
from minigpt4.processors import build_image_processor, build_text_processor

SIZE = 16
EVAL = {"name": "blip2_image_eval", "image_size": SIZE}


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim width x height (CRC fixed): a cheap 'bomb' header."""
    data = bytearray(_encode(Image.new("L", (1, 1), 255), "PNG"))
    ihdr_start = 8 + 8  # signature, then chunk length (4) + type (4)
    data[ihdr_start:ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr_start + 13])) & 0xFFFFFFFF  # over type + 13 data bytes
    data[ihdr_start + 13:ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def _exif_rotated_png() -> bytes:
    """Stored 4x2 with red left / blue right, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = (255, 0, 0)
    pixels[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(pixels, "RGB"), "PNG", exif=exif)


def _palette_png_with_transparency() -> bytes:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)  # one green pixel, the rest is palette entry 0 = transparent
    return _encode(image, "PNG", transparency=0)


def _rgba_png() -> bytes:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    return _encode(image, "PNG")


GOOD_ODD_IMAGES = {
    # name: (bytes, check(pixel array HxWx3 of the loaded image))
    "gray_L": (_encode(Image.new("L", (5, 4), 77), "PNG"), lambda a: a.shape == (4, 5, 3) and np.all(a == 77)),
    "rgba": (_rgba_png(), lambda a: a[0, 0].tolist() == [255, 255, 255] and a[0, 1].tolist() == [0, 0, 255]
             and all(abs(int(v) - 127) <= 1 for v in a[0, 2])),
    "cmyk_jpeg": (_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
                  lambda a: np.all(np.abs(a.astype(int) - [255, 0, 0]) <= 8)),
    "palette_transparent": (_palette_png_with_transparency(),
                            lambda a: a[0, 0].tolist() == [0, 255, 0] and a[3, 3].tolist() == [255, 255, 255]),
    "sixteen_bit": (_encode(Image.fromarray(np.array([[0, 32896], [65535, 65535]], dtype=np.uint16)), "PNG"),
                    lambda a: a[0, 0].tolist() == [0, 0, 0] and a[0, 1].tolist() == [128] * 3
                    and a[1, 0].tolist() == [255] * 3),
    "exif_rotated": (_exif_rotated_png(), lambda a: a.shape == (4, 2, 3) and np.all(a[:2, :, 0] == 255)
                     and np.all(a[2:, :, 2] == 255) and np.all(a[2:, :, 0] == 0)),
    "one_pixel": (_encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), lambda a: a.tolist() == [[[9, 8, 7]]]),
}

_valid_jpeg = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
BAD_IMAGES = {
    "zero_bytes": (b"", "empty"),
    "truncated": (_valid_jpeg[: len(_valid_jpeg) // 2], "cannot decode"),
    "not_an_image": (b"this is a caption, not a picture\n", "not a recognised image format"),
    "bomb_header": (_png_claiming_size(20000, 20000), "decompression-bomb"),
    "over_max_pixels": (_png_claiming_size(12000, 8000), "exceeds max_pixels=89478485"),
}


# ---------------------------------------------------------------- load_rgb


@pytest.mark.parametrize("name", sorted(GOOD_ODD_IMAGES))
def test_load_rgb_converts_odd_modes(tmp_path, name):
    data, check = GOOD_ODD_IMAGES[name]
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    for source in (path, data):
        image = load_rgb(source)
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        assert pixels.dtype == np.uint8
        assert check(pixels), (name, pixels.tolist())


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_load_rgb_refuses_bad_images_naming_the_file(tmp_path, name):
    data, reason = BAD_IMAGES[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=reason) as info:
        load_rgb(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    with pytest.raises(BadImageError, match="shard-7.tar:key"):
        load_rgb(data, name="shard-7.tar:key")


def test_load_rgb_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_encode(Image.new("RGB", (100, 100)), "PNG"))
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadImageError, match="100x100 = 10000 pixels exceeds max_pixels=9999"):
        load_rgb(path, max_pixels=9999)
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(tmp_path / "absent.jpg")


# ---------------------------------------------------------------- caption_json


def _write_image(path: Path, color=(120, 60, 30), size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def _caption_json_fixture(tmp_path: Path, entries: list[dict]) -> tuple[Path, Path]:
    image_dir = tmp_path / "images"
    for entry in entries:
        _write_image(image_dir / f"{entry['image_id']:0>12}.jpg")
    ann_path = tmp_path / "captions.json"
    ann_path.write_text(json.dumps(entries))
    return ann_path, image_dir


def test_caption_json_samples_and_collate(tmp_path):
    entries = [
        {"image_id": 9, "caption": "A Red. Bus!"},
        {"image_id": "25", "caption": "two cats (sleeping)"},
        {"image_id": 9, "caption": "A Red. Bus!"},  # duplicates are separate samples
    ]
    ann_path, image_dir = _caption_json_fixture(tmp_path, entries)
    assert (image_dir / "000000000009.jpg").is_file() and (image_dir / "000000000025.jpg").is_file()
    dataset, collate = build_train_dataset(
        {"caption_json": {"ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL}}
    )
    assert len(dataset) == 3 and collate is collate_samples
    sample = dataset[1]
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample == {**sample, "answer": "two cats sleeping", "instruction": None, "id": "25"}
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert batch["answer"] == ["a red bus", "two cats sleeping", "a red bus"]
    assert batch["instruction"] == [None] * 3 and batch["id"] == ["9", "25", "9"]


def test_caption_json_reports_malformed_json_with_line_and_column(tmp_path):
    ann_path = tmp_path / "broken.json"
    ann_path.write_text('[\n  {"image_id": 1, "caption": "x"},\n  {"image_id": 2 "caption": "y"}\n]')
    with pytest.raises(ValueError, match=rf"{ann_path}:3:18: malformed JSON: Expecting ',' delimiter"):
        CaptionJsonDataset(ann_path, tmp_path, build_image_processor(EVAL),
                           build_text_processor({"name": "blip_caption"}))


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"image_id": 1, "caption": "x"}, r"expected a JSON list"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": 2}], r"\[1\]: missing field 'caption'"),
        ([{"caption": "x"}], r"\[0\]: missing field 'image_id'"),
        ([{"image_id": 1, "caption": 5}], r"\[0\]\.caption: expected a string, got int"),
        ([{"image_id": [1], "caption": "x"}], r"\[0\]\.image_id: expected an integer or a non-empty string"),
        (["just text"], r"\[0\]: expected an object"),
    ],
)
def test_caption_json_field_errors_name_index_and_field(tmp_path, entries, message):
    ann_path = tmp_path / "captions.json"
    ann_path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        CaptionJsonDataset(ann_path, tmp_path, build_image_processor(EVAL),
                           build_text_processor({"name": "blip_caption"}))


def _mixed_quality_fixture(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """One caption_json entry per odd/bad image; returns (ann_path, image_dir, image_id -> kind)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    kinds = {}
    entries = []
    for number, (kind, data) in enumerate(
        [(k, v[0]) for k, v in sorted(GOOD_ODD_IMAGES.items())] + [(k, v[0]) for k, v in sorted(BAD_IMAGES.items())]
    ):
        image_id = str(100 + number)
        (image_dir / f"{image_id:0>12}.jpg").write_bytes(data)
        kinds[image_id] = kind
        entries.append({"image_id": int(image_id), "caption": f"caption of {kind}"})
    ann_path = tmp_path / "captions.json"
    ann_path.write_text(json.dumps(entries))
    return ann_path, image_dir, kinds


def test_caption_json_skips_bad_images_with_a_logged_count(tmp_path, caplog):
    ann_path, image_dir, kinds = _mixed_quality_fixture(tmp_path)
    dataset, _ = build_train_dataset({"caption_json": {
        "ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL, "on_bad_image": "skip"}})
    with caplog.at_level(logging.WARNING):
        samples = [dataset[i] for i in range(len(dataset))]
    returned = {s["id"] for s in samples}
    good = {i for i, k in kinds.items() if k in GOOD_ODD_IMAGES}
    assert returned == good  # every good image is served; bad indices are replaced by the next good one
    assert all(s["image"].shape == (3, SIZE, SIZE) and torch.isfinite(s["image"]).all() for s in samples)
    assert dataset.num_skipped == len(BAD_IMAGES) and dataset.num_bad_images == len(BAD_IMAGES)
    for image_id, kind in kinds.items():
        if kind in BAD_IMAGES:
            assert f"{image_id:0>12}.jpg" in caplog.text


def test_caption_json_error_mode_names_the_bad_file(tmp_path):
    ann_path, image_dir, kinds = _mixed_quality_fixture(tmp_path)
    dataset, _ = build_train_dataset({"caption_json": {
        "ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL, "on_bad_image": "error"}})
    ids = list(kinds)
    for index, image_id in enumerate(ids):
        if kinds[image_id] in BAD_IMAGES:
            with pytest.raises(BadImageError, match=rf"{image_id:0>12}\.jpg: "):
                dataset[index]
        else:
            assert dataset[index]["id"] == image_id


def test_skip_count_is_shared_with_dataloader_workers(tmp_path):
    ann_path, image_dir, kinds = _mixed_quality_fixture(tmp_path)
    dataset, collate = build_train_dataset({"caption_json": {
        "ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL, "on_bad_image": "skip"}})
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate, multiprocessing_context="fork")
    assert sum(len(batch["id"]) for batch in loader) == len(dataset)
    # Skip events are counted per process: each worker counts every bad file it meets once (its own known-bad set).
    # The loader hands batch k to worker k % 2; a bad index walks on to the next readable one, meeting the bad files
    # in between. Worker 0 (indices 0, 1, 4, 5, 8, 9) meets 4 bad files, worker 1 (2, 3, 6, 7, 10, 11) meets 5.
    bad = {i for i, kind in enumerate(kinds.values()) if kind in BAD_IMAGES}
    batches = [list(range(start, start + 2)) for start in range(0, len(kinds), 2)]
    expected = 0
    for worker in range(2):
        met = set()
        for index in (i for batch in batches[worker::2] for i in batch):
            while index in bad:
                met.add(index)
                index = (index + 1) % len(kinds)
        expected += len(met)
    assert (len(bad), expected) == (5, 9)  # more than the 5 bad files: two processes met the same ones
    assert dataset.num_skipped == expected


def test_missing_image_files(tmp_path):
    entries = [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]
    ann_path, image_dir = _caption_json_fixture(tmp_path, entries)
    (image_dir / "000000000002.jpg").unlink()
    cfg = {"ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL}
    with pytest.raises(BadImageError, match=r"000000000002\.jpg: file not found .*1 of 2 images are missing"):
        build_train_dataset({"caption_json": cfg})
    dataset, _ = build_train_dataset({"caption_json": {**cfg, "on_bad_image": "skip"}})
    assert len(dataset) == 1 and dataset.missing_images == [str(image_dir / "000000000002.jpg")]
    assert dataset.num_bad_images == 1


# ---------------------------------------------------------------- cc_sbu_align


def _cc_sbu_align_fixture(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    storage = tmp_path / "cc_sbu_align"
    annotations = []
    for i in range(n):
        _write_image(storage / "image" / f"{i + 2}.jpg", color=(i * 40, 10, 10))
        annotations.append({"image_id": str(i + 2), "caption": f"Image number {i}. It is red!"})
    (storage / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    prompt_path = tmp_path / "alignment.txt"
    prompt_path.write_text("<Img><ImageHere></Img> Describe this image in detail.\n\n"
                           "<Img><ImageHere></Img>Take a look at this image and describe what you notice.\n"
                           "Please provide a detailed description of the picture.\n")
    return storage, prompt_path


def test_cc_sbu_align_one_prompt_per_batch(tmp_path):
    storage, prompt_path = _cc_sbu_align_fixture(tmp_path)
    dataset, collate = build_train_dataset({"cc_sbu_align": {
        "storage": str(storage), "prompt_path": str(prompt_path), "vis_processor": EVAL}}, seed=3)
    assert isinstance(collate, PromptPerBatchCollate)
    assert collate.prompts == ["Describe this image in detail.",
                               "Take a look at this image and describe what you notice.",
                               "Please provide a detailed description of the picture."]
    assert dataset[0]["answer"] == "image number 0 it is red" and dataset[0]["id"] == "2"
    torch.manual_seed(3)  # the built collate draws from torch's RNG (the runner seeds it per batch)
    batches = [collate([dataset[0], dataset[1], dataset[2]]) for _ in range(30)]
    for batch in batches:
        assert len(set(batch["instruction"])) == 1 and batch["instruction"][0] in collate.prompts
        assert batch["image"].shape == (3, 3, SIZE, SIZE)
    chosen = [b["instruction"][0] for b in batches]
    assert len(set(chosen)) == 3  # all prompts get used
    torch.manual_seed(3)
    assert [collate([dataset[0]])["instruction"][0] for _ in range(30)] == chosen
    # a private seeded RNG: reproducible on its own, independent of torch's RNG
    own = PromptPerBatchCollate(collate.prompts, seed=11)
    torch.manual_seed(0)
    first = [own.pick_prompt() for _ in range(20)]
    own_again = PromptPerBatchCollate(collate.prompts, seed=11)
    torch.manual_seed(1)
    assert [own_again.pick_prompt() for _ in range(20)] == first
    assert len(set(first)) > 1


def test_prompted_set_cannot_share_batches(tmp_path):
    storage, prompt_path = _cc_sbu_align_fixture(tmp_path)
    ann_path, image_dir = _caption_json_fixture(tmp_path, [{"image_id": 1, "caption": "a"}])
    with pytest.raises(ValueError, match="cc_sbu_align draws one prompt per batch"):
        build_train_dataset({
            "cc_sbu_align": {"storage": str(storage), "prompt_path": str(prompt_path), "vis_processor": EVAL},
            "caption_json": {"ann_path": str(ann_path), "image_dir": str(image_dir), "vis_processor": EVAL},
        })


def test_concatenated_map_style_sets_sum_their_bad_image_counts(tmp_path):
    text = build_text_processor({"name": "blip_caption"})
    ann_a, dir_a = _caption_json_fixture(tmp_path / "a",
                                         [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}])
    (dir_a / "000000000002.jpg").write_bytes(b"")
    ann_b, dir_b = _caption_json_fixture(tmp_path / "b", [{"image_id": 7, "caption": "c"}])
    parts = [CaptionJsonDataset(ann, folder, build_image_processor(EVAL), text, on_bad_image="skip")
             for ann, folder in ((ann_a, dir_a), (ann_b, dir_b))]
    dataset = CaptionConcatDataset(parts)
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["1", "1", "7"]
    assert dataset.num_skipped == 1 and dataset.num_bad_images == 1


# ---------------------------------------------------------------- webdataset shards


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(color) -> bytes:
    return _encode(Image.new("RGB", (10, 12), color), "JPEG")


def _shards(tmp_path: Path, prefix: str, count: int, per_shard: int = 3, bad_key: str | None = None) -> list[str]:
    paths = []
    for s in range(count):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s:02d}{i:03d}"
            caption = f"{prefix.upper()} caption {s}-{i}."
            sample = {"__key__": key, "jpg": _jpeg((s * 20, i * 20, 90))}
            if i % 2 == 0:
                sample["json"] = json.dumps({"caption": caption, "width": 10}).encode()
            else:
                sample["txt"] = caption.encode()
            if key == bad_key:
                sample["jpg"] = b"\x00not a jpeg"
            samples.append(sample)
        path = tmp_path / prefix / f"{s:05d}.tar"
        _write_shard(path, samples)
        paths.append(str(path))
    return paths


def _web(shards, **kwargs) -> WebCaptionDataset:
    kwargs.setdefault("repeat", False)
    kwargs.setdefault("shuffle_buffer", 0)
    text_processor = build_text_processor({"name": "blip_caption"})
    return WebCaptionDataset(shards, build_image_processor(EVAL), text_processor, **kwargs)


def test_webdataset_reads_json_and_txt_captions(tmp_path):
    shards = _shards(tmp_path, "laion", count=2)
    samples = list(_web(shards))
    assert len(samples) == 6
    answers = {s["id"]: s["answer"] for s in samples}
    assert answers["laion00000"] == "laion caption 0-0" and answers["laion01001"] == "laion caption 1-1"
    assert all(s["image"].shape == (3, SIZE, SIZE) and s["instruction"] is None for s in samples)
    pattern = str(tmp_path / "laion" / "{00000..00001}.tar")
    assert sorted(s["id"] for s in _web(pattern, shuffle_buffer=4, seed=1)) == sorted(answers)


def test_webdataset_bad_image_skip_and_error(tmp_path, caplog):
    shards = _shards(tmp_path, "cc", count=1, per_shard=4, bad_key="cc00002")
    with caplog.at_level(logging.WARNING):
        dataset = _web(shards, on_bad_image="skip")
        ids = [s["id"] for s in dataset]
    assert ids == ["cc00000", "cc00001", "cc00003"] and dataset.num_skipped == 1
    assert "cc00002.jpg" in caplog.text
    with pytest.raises(BadImageError, match=r"00000\.tar:cc00002\.jpg: not a recognised image format"):
        list(_web(shards, on_bad_image="error"))


def test_webdataset_splits_shards_by_rank_and_worker(tmp_path):
    shards = _shards(tmp_path, "laion", count=4, per_shard=2)
    rank0 = {s["id"] for s in _web(shards, rank=0, world_size=2)}
    rank1 = {s["id"] for s in _web(shards, rank=1, world_size=2)}
    assert rank0 and rank1 and not rank0 & rank1 and len(rank0 | rank1) == 8
    loader = DataLoader(_web(shards, rank=1, world_size=2), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    assert {s["id"] for s in loader} == rank1
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        _web(shards, rank=0, world_size=8)


def test_webdataset_repeat_streams_forever(tmp_path):
    shards = _shards(tmp_path, "laion", count=1, per_shard=2)
    ids = [s["id"] for s in islice(iter(_web(shards, repeat=True)), 7)]
    assert len(ids) == 7 and set(ids) == {"laion00000", "laion00001"}


class _Constant(IterableDataset):
    def __init__(self, value: str, limit: int | None = None):
        self.value, self.limit = value, limit

    def __iter__(self):
        count = 0
        while self.limit is None or count < self.limit:
            count += 1
            yield self.value


def test_mix_by_ratio_respects_ratios_and_seed():
    mixed = mix_by_ratio([_Constant("laion"), _Constant("cc_sbu")], [115, 14], seed=0)
    draws = list(islice(iter(mixed), 6000))
    fraction = Counter(draws)["laion"] / len(draws)
    assert abs(fraction - 115 / 129) < 0.015
    assert list(islice(iter(mix_by_ratio([_Constant("a"), _Constant("b")], [1, 1], seed=5)), 50)) == list(
        islice(iter(mix_by_ratio([_Constant("a"), _Constant("b")], [1, 1], seed=5)), 50))
    finite = list(mix_by_ratio([_Constant("a", limit=3), _Constant("b")], [10, 1], seed=1))
    assert finite.count("a") == 3  # stops when a source runs out
    with pytest.raises(ValueError, match="sample_ratio must be a number > 0"):
        mix_by_ratio([_Constant("a")], [0])


def test_build_streaming_mix(tmp_path):
    laion = _shards(tmp_path, "laion", count=2)
    cc = _shards(tmp_path, "cc", count=1)
    dataset, collate = build_train_dataset({
        "laion": {"shards": laion, "vis_processor": EVAL, "sample_ratio": 115, "shuffle_buffer": 4},
        "cc_sbu": {"shards": cc, "vis_processor": EVAL, "sample_ratio": 14},
    }, seed=0)
    batch = collate(list(islice(iter(dataset), 40)))
    assert batch["image"].shape == (40, 3, SIZE, SIZE)
    sources = Counter(i[:2] for i in batch["id"])
    assert sources["la"] > sources["cc"] > 0


# ---------------------------------------------------------------- config validation


def test_option_tables_cover_every_builder():
    assert set(DATASET_OPTION_KEYS) == set(REQUIRED_PATH_KEYS)
    assert {"caption_json", "cc_sbu_align", "laion", "cc_sbu"} <= set(DATASET_OPTION_KEYS)
    assert DATASET_OPTION_KEYS["caption_json"] == {"ann_path", "image_dir", "vis_processor", "text_processor",
                                                   "on_bad_image", "max_pixels", "allow_outside_image_dir"}
    for name, keys in REQUIRED_PATH_KEYS.items():
        assert set(keys) <= DATASET_OPTION_KEYS[name]


def test_validation_errors_name_the_key(tmp_path):
    ann_path, image_dir = _caption_json_fixture(tmp_path, [{"image_id": 1, "caption": "a"}])
    good = {"ann_path": str(ann_path), "image_dir": str(image_dir)}
    validate_dataset_cfg("caption_json", good)
    cases = [
        ("caption_json", {**good, "annpath": "x"}, r"^datasets\.caption_json\.annpath: unknown option; valid: "),
        ("caption_json", {"image_dir": str(image_dir)},
         r"^datasets\.caption_json\.ann_path: required option missing"),
        ("caption_json", {**good, "ann_path": "/x/y.json"},
         r"^datasets\.caption_json\.ann_path: file not found: /x/y\.json"),
        ("caption_json", {**good, "image_dir": str(tmp_path / "nope")},
         r"^datasets\.caption_json\.image_dir: directory not found"),
        ("caption_json", {**good, "on_bad_image": "ignore"}, r"^datasets\.caption_json\.on_bad_image: expected one of"),
        ("caption_json", {**good, "max_pixels": -1}, r"^datasets\.caption_json\.max_pixels: expected a positive"),
        ("caption_json", {**good, "vis_processor": {"name": "clip"}},
         r"^datasets\.caption_json\.vis_processor\.name: unknown image processor"),
        ("caption_json", {**good, "text_processor": {"name": "blip_caption", "max_len": 3}},
         r"^datasets\.caption_json\.text_processor\.max_len: unknown option"),
        ("cc_sbu_align", {"storage": str(tmp_path), "prompt_path": str(ann_path)},
         r"^datasets\.cc_sbu_align\.storage: file not found: .*filter_cap\.json"),
        ("laion", {"shards": str(tmp_path / "{000..002}.tar")},
         r"^datasets\.laion\.shards: 3 of 3 shard files not found"),
        ("laion", {"shards": 5}, r"^datasets\.laion\.shards: expected a path pattern"),
        ("coco", good,
         r"^datasets\.coco: unknown dataset builder 'coco'; valid: caption_json, cc_sbu, cc_sbu_align, laion"),
    ]
    for name, cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_dataset_cfg(name, cfg)
    with pytest.raises(ValueError, match=r"^datasets\.laion\.sample_ratio"):
        validate_dataset_cfg("laion", {"shards": _shards(tmp_path, "laion", 1), "sample_ratio": 0})
    with pytest.raises(ValueError, match=r"^datasets\.caption_json\.annpath: unknown option"):
        build_train_dataset({"caption_json": {**good, "annpath": "x"}})


def test_dictconfig_is_accepted(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    ann_path, image_dir = _caption_json_fixture(tmp_path, [{"image_id": 3, "caption": "A cat."}])
    train_processor = {"name": "blip2_image_train", "image_size": 8}
    cfg = omegaconf.OmegaConf.create({"caption_json": {"ann_path": str(ann_path), "image_dir": str(image_dir),
                                                       "vis_processor": train_processor}})
    dataset, _ = build_train_dataset(cfg)
    assert dataset[0]["image"].shape == (3, 8, 8) and dataset[0]["answer"] == "a cat"
