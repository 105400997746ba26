"""One corpus of hostile inputs, one table: every row is an input a real run can meet and the answer it gets.

An answer is one of
  * Raises(type, fragments): a clear error whose message names the file / key / line and what was expected;
    the exception must be raised by this project's code (its last frame is in this repository), never a
    traceback from deep inside torch, PIL or json;
  * Exits2(fragments[, prefix]): `train.py` / `evaluate.py` `main([...])` returns 2 and prints one line,
    "config error: ..." naming the key before any model or output exists (or, with prefix "error: ", naming the
    data file or tokenizer that failed while the run was being set up), never a traceback;
  * Counted(n): the input is skipped because the config says skip, and the skip is counted (n);
  * Holds(description): the input is accepted and the result is right (checked by the row's own assertions).

Rows are grouped by area: images (dataset path with on_bad_image error/skip, eval ImageLoader error/skip, and a
whole POPE/CHAIR run with skip), JSON/JSONL files, configs, checkpoints, resume and output folders (damaged
checkpoints, full or read-only disks, a folder another run holds), captions, tokenizers. Crash safety
(SIGKILL / SIGTERM resume, failed checkpoint writes, resumable evaluation) lives in test_runner.py and
test_evaluate.py; odd-mode pixel values in test_datasets.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import struct
import tarfile
import threading
import traceback
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

from minigpt4.common.config import ConfigError, merge
from minigpt4.common.files import NotRegularFileError
from minigpt4.common.jsonfiles import DataFileError
from minigpt4.datasets.caption import CaptionJsonDataset
from minigpt4.datasets.images import BadImageError
from minigpt4.datasets.webdata import BadSampleError, WebCaptionDataset
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import read_predictions
from minigpt4.eval.settings import ChairSettings, EvalSettings, PopeSettings
from minigpt4.eval.benchmark_runs import ImageLoader, run_chair, run_pope
from minigpt4.models import checkpoints as ckpt
from minigpt4.models import released_weights
from minigpt4.models.checkpoints import CheckpointError
from minigpt4.models.numerics import NonFiniteLogitsError
from minigpt4.runners.checkpointing import CheckpointWriteError
from minigpt4.processors import build_image_processor, build_text_processor

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(ROOT / "train_configs" / "tiny_cpu.yaml")
SIZE = 16  # processed image side for the image rows
TRAIN_PROC = {"name": "blip2_image_train", "image_size": SIZE}
EVAL_PROC = {"name": "blip2_image_eval", "image_size": SIZE}
TEXT_PROC = {"name": "blip_caption", "max_words": 50}


# ------------------------------------------------------------------------------------------ expectations


@dataclass(frozen=True)
class Raises:
    error: type[BaseException]
    fragments: tuple[str, ...]  # "{tmp}" is replaced by the case's folder
    after: Callable[["Env"], bool] | None = None  # e.g. "the pickle payload did not run"


@dataclass(frozen=True)
class Exits2:
    fragments: tuple[str, ...]
    prefix: str = "config error: "


@dataclass(frozen=True)
class Counted:
    skipped: int


@dataclass(frozen=True)
class Holds:
    description: str


@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[["Env"], Any]
    expect: Raises | Exits2 | Counted | Holds


@dataclass
class Env:
    tmp: Path
    shared: "Shared"


@dataclass
class Shared:
    """Expensive things several rows use, built once per module, on first use."""

    tokenizer_dir: str
    root: Path
    _cache: dict[str, Any] = field(default_factory=dict)

    def model(self, projector: str):
        if projector not in self._cache:
            from minigpt4.common.tiny_models import tiny_model_config
            from minigpt4.models.from_config import build_model

            torch.manual_seed(0)
            self._cache[projector] = build_model(tiny_model_config(self.tokenizer_dir, projector))
        return self._cache[projector]

    def tiny_data_options(self) -> list[str]:
        """--options pointing train.py's tiny recipe at a 24-image world (made once)."""
        if "tiny" not in self._cache:
            import importlib.util

            spec = importlib.util.spec_from_file_location("prepare_tiny", ROOT / "scripts" / "prepare_tiny.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.prepare(str(self.root / "tiny"), num_train=24, num_val=4)
            self._cache["tiny"] = self.root / "tiny"
        d = self._cache["tiny"]
        return [f"model.tokenizer_path={d}/tokenizer", f"datasets.caption_json.ann_path={d}/world/train_captions.json",
                f"datasets.caption_json.image_dir={d}/world/images"]


# ----------------------------------------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (CRC fixed) claims width x height: a decompression bomb's header, 70 bytes."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    """Stored 8 wide x 4 tall, red left / blue right, EXIF orientation 6: upright it is red on top."""
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def _palette_png() -> bytes:
    image = Image.new("P", (6, 6), 0)
    image.putpalette([200, 10, 10, 10, 200, 10] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    return _encode(image, "PNG")


_NOISE_JPEG = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
BAD_IMAGES = {  # name: (bytes, what the error says)
    "zero-bytes": (b"", "empty"),
    "truncated": (_NOISE_JPEG[: len(_NOISE_JPEG) // 2], "cannot decode image"),
    "not-an-image": (b"a dog on a sofa\n", "not a recognised image format"),
    "bomb-20000x20000": (_png_header_claiming(20000, 20000), "decompression-bomb"),
}
GOOD_IMAGES = {
    "grayscale": _encode(Image.new("L", (9, 7), 90), "PNG"),
    "rgba": _encode(Image.new("RGBA", (9, 7), (0, 0, 255, 100)), "PNG"),
    "cmyk": _encode(Image.new("CMYK", (9, 7), (0, 255, 255, 0)), "JPEG"),
    "palette": _palette_png(),
    "16-bit": _encode(Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)), "PNG"),
    "exif-rotated": _exif_rotated_jpeg(),
    "1x1": _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
}
GOOD_RGB = _encode(Image.new("RGB", (20, 14), (120, 60, 30)), "JPEG")


def _caption_dataset(env: Env, image: bytes, on_bad_image: str) -> CaptionJsonDataset:
    """Image 1 is the one under test, image 2 a plain good JPEG (what a skip falls through to)."""
    images = env.tmp / "images"
    images.mkdir()
    (images / "000000000001.jpg").write_bytes(image)
    (images / "000000000002.jpg").write_bytes(GOOD_RGB)
    ann = env.tmp / "captions.json"
    ann.write_text(json.dumps([{"image_id": 1, "caption": "the image under test"},
                               {"image_id": 2, "caption": "a brown square"}]))
    return CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                              on_bad_image=on_bad_image)


def dataset_bad_image(image: bytes, on_bad_image: str, env: Env) -> int:
    dataset = _caption_dataset(env, image, on_bad_image)
    sample = dataset[0]
    assert sample["id"] == "2" and sample["answer"] == "a brown square"  # the next readable sample
    dataset[0]  # a known-bad file is neither decoded nor counted twice
    return dataset.num_skipped


def dataset_good_image(image: bytes, env: Env) -> bool:
    dataset = _caption_dataset(env, image, "error")
    sample = dataset[0]
    assert sample["id"] == "1" and sample["image"].shape == (3, SIZE, SIZE)
    assert torch.isfinite(sample["image"]).all()
    return True


def _eval_loader(env: Env, image: bytes, on_bad_image: str) -> tuple[ImageLoader, str]:
    path = env.tmp / "COCO_val2014_000000000001.jpg"
    path.write_bytes(image)
    return ImageLoader(EvalSettings(on_bad_image=on_bad_image, vis_processor=dict(EVAL_PROC))), str(path)


def eval_bad_image(image: bytes, on_bad_image: str, env: Env) -> int:
    loader, path = _eval_loader(env, image, on_bad_image)
    assert loader(path) is None
    assert loader.skipped == [path]
    return len(loader.skipped)


def eval_good_image(name: str, image: bytes, env: Env) -> bool:
    loader, path = _eval_loader(env, image, "error")
    pixels = loader(path)
    assert pixels.shape == (3, SIZE, SIZE) and torch.isfinite(pixels).all()
    if name == "exif-rotated":  # upright: red on top, blue below (the stored image was red left, blue right)
        top, bottom = pixels[:, : SIZE // 2].mean((1, 2)), pixels[:, SIZE // 2:].mean((1, 2))
        assert top[0] > bottom[0] and top[2] < bottom[2], (top, bottom)
    return True


class _YesModel:
    """Just enough of a model for run_pope / run_chair: answers "Yes, a dog" to everything."""

    end_sym = "###"
    tokenizer = staticmethod(lambda text, add_special_tokens=False: SimpleNamespace(input_ids=text.split()))

    def generate(self, prompts, images, **_):
        assert images.shape[0] == len(prompts)
        return ["Yes, there is a dog."] * len(prompts)


def _benchmark_images(env: Env) -> Path:
    images = env.tmp / "val2014"
    images.mkdir()
    (images / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    (images / "COCO_val2014_000000000002.jpg").write_bytes(BAD_IMAGES["truncated"][0])
    return images


def pope_run_with_skip(env: Env) -> int:
    images = _benchmark_images(env)
    (env.tmp / "pope").mkdir()
    rows = [{"question_id": q, "image": f"COCO_val2014_{1 + q % 2:012d}.jpg", "text": "Is there a dog?",
             "label": "yes" if q < 2 else "no"} for q in range(4)]
    (env.tmp / "pope" / "random.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = EvalSettings(image_dir=str(images), on_bad_image="skip", bootstrap=0, vis_processor=dict(EVAL_PROC),
                            pope=PopeSettings(dir=str(env.tmp / "pope"), splits=["random"]))
    result = run_pope(_YesModel(), settings, str(env.tmp / "out"))
    assert result["n"] == 2 and result["yes_ratio"] == 1.0  # scored over the two answerable questions only
    assert result["skipped"]["random"] == {"questions": 2, "images": ["COCO_val2014_000000000002.jpg"]}
    return len(result["skipped"]["random"]["images"])


def chair_run_with_skip(env: Env) -> int:
    images = _benchmark_images(env)
    ann = env.tmp / "annotations"
    ann.mkdir()
    listed = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2)]
    (ann / "instances_val2014.json").write_text(json.dumps(
        {"images": listed, "categories": [{"id": 18, "name": "dog"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 18}]}))
    (ann / "captions_val2014.json").write_text(json.dumps(
        {"images": listed, "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    settings = EvalSettings(image_dir=str(images), on_bad_image="skip", bootstrap=0, vis_processor=dict(EVAL_PROC),
                            chair=ChairSettings(coco_annotations=str(ann), num_images=None))
    result = run_chair(_YesModel(), settings, str(env.tmp / "out"))
    assert result["n_captions"] == 1 and result["chair_s"] == 0.0  # the dog is there: nothing hallucinated
    return result["skipped"]["images"]


def _pope_file(env: Env, image: str) -> EvalSettings:
    """A one-question POPE split whose question names `image` ("{tmp}" is the case's folder)."""
    (env.tmp / "pope").mkdir()
    row = {"question_id": 1, "image": image.replace("{tmp}", str(env.tmp)), "text": "Is there a dog?", "label": "yes"}
    (env.tmp / "pope" / "random.jsonl").write_text(json.dumps(row) + "\n")
    (env.tmp / "val2014").mkdir()
    return EvalSettings(image_dir=str(env.tmp / "val2014"), bootstrap=0, vis_processor=dict(EVAL_PROC),
                        pope=PopeSettings(dir=str(env.tmp / "pope"), splits=["random"]))


def pope_image_outside(image: str, env: Env) -> None:
    from minigpt4.eval.benchmark_runs import pope_items

    pope_items(_pope_file(env, image), "random")


def pope_image_outside_allowed(env: Env) -> bool:
    (env.tmp / "elsewhere").mkdir()
    (env.tmp / "elsewhere" / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    settings = _pope_file(env, "../elsewhere/COCO_val2014_000000000001.jpg")
    settings.allow_outside_image_dir = True
    result = run_pope(_YesModel(), settings, str(env.tmp / "out"))
    assert result["n"] == 1 and "skipped" not in result  # the file outside image_dir was read and answered
    return True


def chair_list_image_outside(env: Env) -> None:
    from minigpt4.eval.benchmark_runs import chair_items

    (env.tmp / "val2014").mkdir()
    path = _write(env, "images.json", json.dumps([{"image_id": "../../COCO_val2014_000000000001.jpg"}]))
    chair_items(EvalSettings(image_dir=str(env.tmp / "val2014"), chair=ChairSettings(images=str(path))))


def caption_image_outside(text: str, env: Env) -> int:
    return caption_json(text, env)  # (defined with the JSON rows below)


def caption_image_outside_allowed(env: Env) -> bool:
    (env.tmp / "images").mkdir()
    (env.tmp / "elsewhere").mkdir()
    (env.tmp / "elsewhere" / "photo.jpg").write_bytes(GOOD_RGB)
    ann = _write(env, "captions.json", json.dumps([{"image_id": "../elsewhere/photo", "caption": "a brown square"}]))
    dataset = CaptionJsonDataset(ann, env.tmp / "images", build_image_processor(TRAIN_PROC),
                                 build_text_processor(TEXT_PROC), allow_outside_image_dir=True)
    assert dataset[0]["id"] == "../elsewhere/photo" and dataset[0]["image"].shape == (3, SIZE, SIZE)
    return True


# Not regular files (issue 13 items 2 and 8). A FIFO blocks open() forever and a link to /dev/zero never reaches
# end-of-file, so these rows run under a time limit; each path must be refused from its metadata, saying what it is.
TIME_LIMIT_S = 10.0
NOT_REGULAR = {  # name: (make one at a path, what the error says it is)
    "fifo": (os.mkfifo, "a FIFO (named pipe)"),
    "link-to-dev-zero": (partial(os.symlink, "/dev/zero"), "a symbolic link to /dev/zero, which is a character device"),
    "directory": (os.mkdir, "a directory"),
}


def _release_fifos(folder: Path) -> None:
    """A reader blocked opening a FIFO returns once a writer opens the other end (and then reads end-of-file)."""
    for path in folder.rglob("*"):
        if path.is_fifo():
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def within_time_limit(act: Callable[[Env], Any], env: Env) -> Any:
    """act(env) in a thread given TIME_LIMIT_S: a hang fails this row instead of stalling the whole suite."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = act(env)
        except BaseException as err:  # re-raised below, its traceback (the raising frame) intact
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    if thread.is_alive():
        _release_fifos(env.tmp)
        raise AssertionError(f"still reading after {TIME_LIMIT_S:.0f} s: a FIFO or a device was opened")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def dataset_not_regular(kind: str, on_bad_image: str, env: Env) -> int:
    images = env.tmp / "images"
    images.mkdir()
    NOT_REGULAR[kind][0](images / "000000000001.jpg")
    (images / "000000000002.jpg").write_bytes(GOOD_RGB)
    ann = _write_json(env, "captions.json", [{"image_id": 1, "caption": "the image under test"},
                                             {"image_id": 2, "caption": "a brown square"}])
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                                 on_bad_image=on_bad_image)
    assert len(dataset) == 1 and dataset[0]["id"] == "2"
    return len(dataset.missing_images)


def eval_not_regular(kind: str, on_bad_image: str, feature_cache: bool, env: Env) -> int:
    """The plain eval image path, or the feature cache's (which hashes the file before anything else)."""
    from minigpt4.eval.feature_cache import build_feature_source

    path = env.tmp / "COCO_val2014_000000000001.jpg"
    NOT_REGULAR[kind][0](path)
    loader = ImageLoader(EvalSettings(on_bad_image=on_bad_image, vis_processor=dict(EVAL_PROC)))
    load = loader
    if feature_cache:
        load = build_feature_source(env.shared.model("vib"), str(env.tmp / "cache"), dict(EVAL_PROC), loader)
        assert load.prefill([str(path)], batch_size=2) == 0  # nothing encodable, nothing hashed forever
    assert load(str(path)) is None
    return len(loader.skipped)


def _write_json(env: Env, name: str, content: Any) -> Path:
    path = env.tmp / name
    path.write_text(json.dumps(content))
    return path


def not_regular_file_read(kind: str, reader: str, env: Env) -> Any:
    """Each reader of a file a user names, given a FIFO / device link / folder where the file should be."""
    from minigpt4.common.files import sha256_file
    from minigpt4.common.provenance import HashCache

    path = env.tmp / {"checkpoint": "trainable.safetensors", "pope": "random.jsonl"}.get(reader, "captions.json")
    NOT_REGULAR[kind][0](path)
    if reader == "checkpoint":
        return ckpt.load_state_file(path)
    if reader == "pope":
        return pope_scorer.load_questions(path)
    if reader == "caption-json":
        (env.tmp / "images").mkdir()
        return CaptionJsonDataset(path, env.tmp / "images", build_image_processor(TRAIN_PROC),
                                  build_text_processor(TEXT_PROC))
    if reader == "provenance-hash":
        return HashCache(env.tmp / "sha256.json").sha256(path)
    return sha256_file(path)


def tokenizer_folder_with_fifo(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    folder = env.tmp / "vicuna-7b"
    shutil.copytree(env.shared.tokenizer_dir, folder)
    os.mkfifo(folder / "model-00001-of-00002.safetensors")
    build_model(tiny_model_config(str(folder), "linear"))


def _not_regular(kind: str) -> str:
    return f"not a regular file: {NOT_REGULAR[kind][1]}"


NOT_REGULAR_CASES = (
    [Case(f"image/{kind}/dataset-error", partial(within_time_limit, partial(dataset_not_regular, kind, "error")),
          Raises(BadImageError, ("{tmp}/images/000000000001.jpg: " + _not_regular(kind), "listed in")))
     for kind in NOT_REGULAR]
    + [Case(f"image/{kind}/dataset-skip", partial(within_time_limit, partial(dataset_not_regular, kind, "skip")),
            Counted(1)) for kind in NOT_REGULAR]
    + [Case(f"image/{kind}/eval{'-feature-cache' if cache else ''}-error",
            partial(within_time_limit, partial(eval_not_regular, kind, "error", cache)),
            Raises(BadImageError, ("{tmp}/COCO_val2014_000000000001.jpg: " + _not_regular(kind),)))
       for kind in NOT_REGULAR for cache in (False, True)]
    + [Case(f"image/{kind}/eval{'-feature-cache' if cache else ''}-skip",
            partial(within_time_limit, partial(eval_not_regular, kind, "skip", cache)), Counted(1))
       for kind in ("fifo", "link-to-dev-zero") for cache in (False, True)]
    + [Case(f"not-regular/{kind}/{reader}", partial(within_time_limit, partial(not_regular_file_read, kind, reader)),
            Raises(error, ("{tmp}/", "not a regular file", NOT_REGULAR[kind][1])))
       for kind in ("fifo", "link-to-dev-zero")
       for reader, error in (("checkpoint", CheckpointError), ("pope", DataFileError),
                             ("caption-json", DataFileError), ("provenance-hash", NotRegularFileError),
                             ("sha256", NotRegularFileError))]
    + [Case("not-regular/fifo/among-tokenizer-files", partial(within_time_limit, tokenizer_folder_with_fifo),
            Raises(ConfigError, ("file in model.tokenizer_path is not a regular file",
                                 "model-00001-of-00002.safetensors is a FIFO (named pipe)")))]
)


OUTSIDE = ("is outside the image folder", "an absolute path or one that climbs out with '..'")


IMAGE_CASES = (
    [Case(f"image/{name}/dataset-error", partial(dataset_bad_image, data, "error"),
          Raises(BadImageError, ("{tmp}/images/000000000001.jpg", reason)))
     for name, (data, reason) in BAD_IMAGES.items()]
    + [Case(f"image/{name}/dataset-skip", partial(dataset_bad_image, data, "skip"), Counted(1))
       for name, (data, _) in BAD_IMAGES.items()]
    + [Case(f"image/{name}/eval-error", partial(eval_bad_image, data, "error"),
            Raises(BadImageError, ("{tmp}/COCO_val2014_000000000001.jpg", reason)))
       for name, (data, reason) in BAD_IMAGES.items()]
    + [Case(f"image/{name}/eval-skip", partial(eval_bad_image, data, "skip"), Counted(1))
       for name, (data, _) in BAD_IMAGES.items()]
    + [Case(f"image/{name}/dataset", partial(dataset_good_image, data), Holds("decoded to RGB, 3xSxS, finite"))
       for name, data in GOOD_IMAGES.items()]
    + [Case(f"image/{name}/eval", partial(eval_good_image, name, data), Holds("decoded upright to RGB, finite"))
       for name, data in GOOD_IMAGES.items()]
    + [Case("image/unreadable/pope-run-skip", pope_run_with_skip, Counted(1)),
       Case("image/unreadable/chair-run-skip", chair_run_with_skip, Counted(1))]
    + NOT_REGULAR_CASES
    # names from a data file that leave the image folder (issue 13 item 7): refused, naming file and entry
    + [Case("image/outside-image-dir/pope-climbs-out", partial(pope_image_outside, "../../secret.jpg"),
            Raises(ConfigError, ("{tmp}/pope/random.jsonl: question_id 1", "'../../secret.jpg'", *OUTSIDE,
                                 "set eval.allow_outside_image_dir: true"))),
       Case("image/outside-image-dir/pope-absolute", partial(pope_image_outside, "{tmp}/elsewhere/x.jpg"),
            Raises(ConfigError, ("random.jsonl: question_id 1", "'{tmp}/elsewhere/x.jpg'", *OUTSIDE))),
       Case("image/outside-image-dir/chair-list", chair_list_image_outside,
            Raises(ConfigError, ("eval.chair.images: {tmp}/images.json: entry '../../COCO_val2014_000000000001.jpg'",
                                 *OUTSIDE, "eval.allow_outside_image_dir"))),
       Case("image/outside-image-dir/caption-json-climbs-out",
            partial(caption_image_outside, json.dumps([{"image_id": "../../../../../etc/hostname", "caption": "a"}])),
            Raises(ConfigError, ("{tmp}/captions.json[0].image_id", "'../../../../../etc/hostname.jpg'", *OUTSIDE,
                                 "set datasets.caption_json.allow_outside_image_dir: true"))),
       Case("image/outside-image-dir/caption-json-absolute",
            partial(caption_image_outside, json.dumps([{"image_id": 1, "caption": "a"},
                                                       {"image_id": "/etc/hostname", "caption": "b"}])),
            Raises(ConfigError, ("captions.json[1].image_id", "'/etc/hostname.jpg'", *OUTSIDE))),
       Case("image/outside-image-dir/pope-allowed", pope_image_outside_allowed,
            Holds("eval.allow_outside_image_dir: true reads the file outside image_dir")),
       Case("image/outside-image-dir/caption-json-allowed", caption_image_outside_allowed,
            Holds("allow_outside_image_dir=True reads the file outside image_dir"))]
)


# -------------------------------------------------------------------------------------------- JSON / JSONL


def _write(env: Env, name: str, text: str | bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def caption_json(text: str | bytes, env: Env) -> int:
    images = env.tmp / "images"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i:012d}.jpg").write_bytes(GOOD_RGB)
    ann = _write(env, "captions.json", text)
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC))
    return len(dataset)


def pope_questions(text: str | bytes, env: Env, require_text: bool = False) -> list[dict]:
    return pope_scorer.load_questions(_write(env, "random.jsonl", text), require_text=require_text)


def pope_answers(text: str | bytes, env: Env) -> list[str]:
    questions_path = _write(env, "random.jsonl", "".join(
        json.dumps({"question_id": q, "image": "a.jpg", "text": "?", "label": "yes"}) + "\n" for q in (1, 2)))
    questions = pope_scorer.load_questions(questions_path)
    return pope_scorer.match_answers(questions, questions_path, _write(env, "answers.jsonl", text))


def chair_captions(text: str | bytes, env: Env) -> list[dict]:
    return chair_scorer.load_captions(_write(env, "captions.jsonl", text))


def predictions(text: str | bytes, env: Env) -> dict:
    return read_predictions(str(_write(env, "pope_random_answers.jsonl", text)))


def chair_image_list(text: str | bytes, env: Env) -> list[str]:
    from minigpt4.eval.benchmark_runs import chair_image_list as image_list

    path = _write(env, "images.json", text)
    return image_list(EvalSettings(image_dir=str(env.tmp), chair=ChairSettings(images=str(path))))


def chair_items_from(images: str | None, env: Env) -> list:
    """CHAIR generation items from an image list file with text `images`, or (None) a sample of an empty folder."""
    from minigpt4.eval.benchmark_runs import chair_items

    (env.tmp / "val2014").mkdir()
    path = None if images is None else str(_write(env, "images.json", images))
    return chair_items(EvalSettings(image_dir=str(env.tmp / "val2014"), chair=ChairSettings(images=path)))


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def coco_instances(text: str, env: Env) -> dict:
    ann = env.tmp / "annotations"
    ann.mkdir()
    _write(env, "annotations/instances_val2014.json", text)
    _write(env, "annotations/captions_val2014.json", json.dumps({"images": [], "annotations": []}))
    return chair_scorer.build_ground_truth(ann)


def train_with_captions(data: bytes, env: Env) -> tuple[int, str]:
    """train.py on the tiny recipe with `data` as its caption JSON: the dataset is built before any model."""
    import train

    ann = _write(env, "captions.json", data)
    options = env.shared.tiny_data_options() + [f"datasets.caption_json.ann_path={ann}",
                                                f"run.output_dir={env.tmp / 'out'}"]
    with _no_model_build():
        return train.main(["--cfg-path", TINY_RECIPE, "--options", *options]), ""


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows editors put first
CAFE_LATIN1 = "caf\u00e9".encode("latin-1")  # not UTF-8: a lone 0xe9
NAN_CAPTIONS = b'[{"image_id": 1, "caption": "NaN bread"},\n{"image_id": 2, "caption": NaN}]'


Q = {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "yes"}

JSON_CASES = [
    # caption JSON (the AdaVIB/LURE training annotations)
    Case("json/caption/malformed-line",
         partial(caption_json, '[\n{"image_id": 1, "caption": "a"},\n{"image_id": 2,,}\n]'),
         Raises(ValueError, ("{tmp}/captions.json:3:", "malformed JSON"))),
    Case("json/caption/not-a-list", partial(caption_json, '{"image_id": 1, "caption": "a"}'),
         Raises(ValueError, ("captions.json", "expected a JSON list"))),
    Case("json/caption/missing-field", partial(caption_json, '[{"image_id": 1, "caption": "a"}, {"image_id": 2}]'),
         Raises(ValueError, ("captions.json[1]", "missing field 'caption'"))),
    Case("json/caption/caption-not-a-string", partial(caption_json, '[{"image_id": 1, "caption": 7}]'),
         Raises(ValueError, ("captions.json[0].caption", "expected a string"))),
    Case("json/caption/image-id-wrong-type", partial(caption_json, '[{"image_id": [1], "caption": "a"}]'),
         Raises(ValueError, ("captions.json[0].image_id", "expected an integer or a non-empty string"))),
    Case("json/caption/duplicate-image-ids",
         partial(caption_json, '[{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "a gray cat"}]'),
         Holds("two samples: COCO-style data has several captions per image")),
    # POPE questions
    Case("jsonl/pope-questions/malformed-line", partial(pope_questions, _lines(Q, '{"question_id": 2, "image"')),
         Raises(ValueError, ("{tmp}/random.jsonl:2:", "not valid JSON"))),
    Case("jsonl/pope-questions/missing-label",
         partial(pope_questions, _lines({k: v for k, v in Q.items() if k != "label"})),
         Raises(ValueError, ("random.jsonl:1:", "no 'label' key"))),
    Case("jsonl/pope-questions/missing-text-for-generation",
         partial(pope_questions, _lines({k: v for k, v in Q.items() if k != "text"}), require_text=True),
         Raises(ValueError, ("random.jsonl:1:", "no 'text' key"))),
    Case("jsonl/pope-questions/text-not-a-string", partial(pope_questions, _lines({**Q, "text": 3}), require_text=True),
         Raises(ValueError, ("random.jsonl:1:", "text must be the question as a non-empty string"))),
    Case("jsonl/pope-questions/question-id-null", partial(pope_questions, _lines({**Q, "question_id": None})),
         Raises(ValueError, ("random.jsonl:1:", "question_id must be an integer or a non-empty string, got None"))),
    Case("jsonl/pope-questions/image-wrong-type", partial(pope_questions, _lines({**Q, "image": ["a.jpg"]})),
         Raises(ValueError, ("random.jsonl:1:", "image must be an integer or a non-empty string"))),
    Case("jsonl/pope-questions/label-not-yes-no", partial(pope_questions, _lines({**Q, "label": "maybe"})),
         Raises(ValueError, ("random.jsonl:1:", "label must be 'yes' or 'no'"))),
    Case("jsonl/pope-questions/duplicate-question-id", partial(pope_questions, _lines(Q, {**Q, "image": "b.jpg"})),
         Raises(ValueError, ("random.jsonl:2:", "duplicate question_id 1 (first on line 1)"))),
    # POPE answers
    Case("jsonl/pope-answers/malformed-line", partial(pope_answers, _lines({"question_id": 1, "answer": "yes"}, "{")),
         Raises(ValueError, ("{tmp}/answers.jsonl:2:", "not valid JSON"))),
    Case("jsonl/pope-answers/duplicate-answer",
         partial(pope_answers, _lines(*({"question_id": q, "answer": "no"} for q in (1, 2, 2)))),
         Raises(ValueError, ("answers.jsonl:3:", "duplicate answer for question_id 2"))),
    Case("jsonl/pope-answers/answer-not-a-string",
         partial(pope_answers, _lines({"question_id": 1, "answer": True}, {"question_id": 2, "answer": "no"})),
         Raises(ValueError, ("answers.jsonl:1:", "answer must be a string"))),
    Case("jsonl/pope-answers/missing-answer", partial(pope_answers, _lines({"question_id": 1, "answer": "no"})),
         Raises(ValueError, ("answers.jsonl", "no answer for 1 question(s)", "[2]"))),
    # CHAIR captions
    Case("jsonl/chair-captions/malformed-line", partial(chair_captions, _lines({"image_id": 1, "caption": "a"}, "{]")),
         Raises(ValueError, ("{tmp}/captions.jsonl:2:", "not valid JSON"))),
    Case("jsonl/chair-captions/missing-caption", partial(chair_captions, _lines({"image_id": 1})),
         Raises(ValueError, ("captions.jsonl:1:", "expected an object with 'image_id' and 'caption'"))),
    Case("jsonl/chair-captions/caption-not-a-string", partial(chair_captions, _lines({"image_id": 1, "caption": 5})),
         Raises(ValueError, ("captions.jsonl:1:", "'caption' must be a string"))),
    Case("jsonl/chair-captions/image-id-unreadable",
         partial(chair_captions, _lines({"image_id": "dog", "caption": "a"})),
         Raises(ValueError, ("captions.jsonl:1:", "cannot read a COCO image id from 'dog'"))),
    Case("jsonl/chair-captions/duplicate-image-id",
         partial(chair_captions, _lines({"image_id": 3, "caption": "a"}, {"image_id": "COCO_val2014_000000000003.jpg",
                                                                         "caption": "b"})),
         Holds("both rows kept and scored, as the reference CHAIR does (no de-duplication)")),
    Case("json/chair-image-list/malformed", partial(chair_image_list, '[{"image_id": 1},'),
         Raises(ValueError, ("eval.chair.images", "{tmp}/images.json:1:", "malformed JSON"))),
    # empty benchmark files: refused as empty (issue 13 item 6), before evaluate.py builds a model (config rows)
    Case("jsonl/pope-questions/empty-file", partial(pope_questions, ""),
         Raises(ValueError, ("{tmp}/random.jsonl: no questions",))),
    Case("json/chair-image-list/empty", partial(chair_items_from, "[]"),
         Raises(DataFileError, ("eval.chair.images: {tmp}/images.json lists no images", "CHAIR needs at least one"))),
    Case("json/chair-image-list/empty-image-dir", partial(chair_items_from, None),
         Raises(DataFileError, ("eval.image_dir: {tmp}/val2014 has no .jpg/.jpeg/.png file",))),
    # predictions written by evaluate.py (and read back to resume)
    Case("jsonl/predictions/malformed-line", partial(predictions, _lines({"key": "1", "answer": "a"}, "{x", "{}")),
         Raises(ValueError, ("{tmp}/pope_random_answers.jsonl:2:", "not valid JSON"))),
    Case("jsonl/predictions/missing-key", partial(predictions, _lines({"answer": "yes"})),
         Raises(ValueError, ("pope_random_answers.jsonl:1:", "with a 'key'"))),
    Case("jsonl/predictions/not-an-object", partial(predictions, _lines([1, 2])),
         Raises(ValueError, ("pope_random_answers.jsonl:1:", "expected a JSON object"))),
    Case("jsonl/predictions/duplicate-key",
         partial(predictions, _lines({"key": 7, "answer": "a"}, {"key": "7", "answer": "b"})),
         Raises(ValueError, ("pope_random_answers.jsonl:2:", "key '7' again (first on line 1)"))),
    # NaN / Infinity (Python's json reads them; JSON has no such numbers), other encodings, a byte-order mark
    Case("json/caption/nan-field", partial(caption_json, NAN_CAPTIONS),  # the "NaN" in a string is no match
         Raises(DataFileError, ("{tmp}/captions.json:2:28: NaN is not valid JSON",))),
    Case("json/caption/infinity-in-extra-field",
         partial(caption_json, '[{"image_id": 1, "caption": "a", "score": Infinity}]'),
         Raises(DataFileError, ("captions.json:1:", "Infinity is not valid JSON"))),
    Case("json/caption/not-utf8", partial(caption_json, b'[{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}]'),
         Raises(DataFileError, ("{tmp}/captions.json:1: not UTF-8 text (byte 0xe9 at offset 32)",))),
    Case("json/caption/utf8-bom", partial(caption_json, BOM + b'[{"image_id": 1, "caption": "a"}]'),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/caption/nan-field/train-cli", partial(train_with_captions, NAN_CAPTIONS),
         Exits2(("captions.json:2:28: NaN is not valid JSON",), prefix="error: ")),
    Case("json/caption/not-utf8/train-cli",
         partial(train_with_captions, b'[{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}]'),
         Exits2(("captions.json:1: not UTF-8 text",), prefix="error: ")),
    Case("jsonl/pope-questions/nan-question-id",
         partial(pope_questions, _lines(Q, '{"question_id": NaN, "image": "a.jpg", "label": "yes"}')),
         Raises(DataFileError, ("{tmp}/random.jsonl:2:17: NaN is not valid JSON",))),
    Case("jsonl/pope-questions/not-utf8",
         partial(pope_questions, _lines({**Q, "text": "Is there a cafe?"}).encode().replace(b"cafe", CAFE_LATIN1)),
         Raises(DataFileError, ("random.jsonl:1: not UTF-8 text",))),
    Case("jsonl/pope-questions/utf8-bom", partial(pope_questions, BOM + _lines(Q).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("jsonl/pope-answers/infinity",
         partial(pope_answers, _lines('{"question_id": 1, "answer": "yes", "logprob": -Infinity}')),
         Raises(DataFileError, ("{tmp}/answers.jsonl:1:", "-Infinity is not valid JSON"))),
    Case("jsonl/pope-answers/utf8-bom",
         partial(pope_answers, BOM + _lines(*({"question_id": q, "answer": "no"} for q in (1, 2))).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("jsonl/chair-captions/nan-image-id", partial(chair_captions, _lines('{"image_id": NaN, "caption": "a"}')),
         Raises(DataFileError, ("{tmp}/captions.jsonl:1:14: NaN is not valid JSON",))),
    Case("jsonl/chair-captions/not-utf8",
         partial(chair_captions, b'{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}\n'),
         Raises(DataFileError, ("captions.jsonl:1: not UTF-8 text",))),
    Case("jsonl/chair-captions/utf8-bom", partial(chair_captions, BOM + _lines({"image_id": 1, "caption": "a"}).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/chair-image-list/nan", partial(chair_image_list, '[{"image_id": NaN}]'),
         Raises(DataFileError, ("eval.chair.images", "{tmp}/images.json:1:15: NaN is not valid JSON"))),
    Case("json/chair-image-list/utf8-bom", partial(chair_image_list, BOM + b'[{"image_id": 1}, {"image_id": 2}]'),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/coco-annotations/nan", partial(coco_instances, '{"images": [], "annotations": [{"id": 1, '
                                                               '"image_id": 1, "category_id": NaN}]}'),
         Raises(DataFileError, ("{tmp}/annotations/instances_val2014.json:1:", "NaN is not valid JSON"))),
    Case("jsonl/predictions/nan", partial(predictions, _lines('{"key": "1", "answer": NaN}')),
         Raises(DataFileError, ("{tmp}/pope_random_answers.jsonl:1:", "NaN is not valid JSON"))),
    Case("jsonl/predictions/not-utf8", partial(predictions, b'{"key": "1", "answer": "' + CAFE_LATIN1 + b'"}\n'),
         Raises(DataFileError, ("pope_random_answers.jsonl:1: not UTF-8 text",))),
]

EXPECTED_VALUES = {  # what the Holds rows above return
    "json/caption/duplicate-image-ids": 2,
    "jsonl/chair-captions/duplicate-image-id": [{"image_id": 3, "caption": "a"}, {"image_id": 3, "caption": "b"}],
    "json/caption/utf8-bom": 1,
    "jsonl/pope-questions/utf8-bom": [Q],
    "jsonl/pope-answers/utf8-bom": ["no", "no"],
    "jsonl/chair-captions/utf8-bom": [{"image_id": 1, "caption": "a"}],
    "json/chair-image-list/utf8-bom": ["1", "2"],
}


# ------------------------------------------------------------------------------------------------- configs


@contextlib.contextmanager
def _no_model_build():
    """A config that slipped through validation must fail here, not start a whole training or evaluation."""
    from minigpt4.models import from_config as builder

    def refuse(*_, **__):
        raise AssertionError("the config was accepted and a model was about to be built")

    original, builder.build_model = builder.build_model, refuse
    try:
        yield
    finally:
        builder.build_model = original


def train_main(option: str, env: Env, recipe: str | bytes | None = None) -> tuple[int, str]:
    """train.py on the tiny recipe (or on `recipe`, the text of a recipe file) plus `option`."""
    import train

    out = env.tmp / "out"
    options = env.shared.tiny_data_options() + [f"run.output_dir={out}", option]
    cfg_path = TINY_RECIPE if recipe is None else str(_write(env, "recipe.yaml", recipe))
    with _no_model_build():
        rc = train.main(["--cfg-path", cfg_path, "--options", *options])
    assert not out.exists()  # stopped before any model or output was made
    return rc, ""


def evaluate_main(option: str, env: Env, recipe: str | bytes = "eval: {}\n") -> tuple[int, str]:
    import evaluate

    for folder in ("val2014", "annotations"):
        (env.tmp / folder).mkdir()
    out = env.tmp / "out"
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={out}", "eval.device=cpu",
               option]
    cfg = _write(env, "recipe.yaml", recipe)  # no --cfg-path would mean the embedded shapes-world config
    with _no_model_build():
        rc = evaluate.main(["--cfg-path", str(cfg), "--options", *options])
    assert not out.exists()
    return rc, ""


TINY_TEXT = Path(TINY_RECIPE).read_text(encoding="utf-8")
SEED_LINE = TINY_TEXT[: TINY_TEXT.index("  seed: 42\n")].count("\n") + 1  # 1-based line of run.seed


def yaml_with_bom(env: Env) -> bool:
    import train

    recipe = _write(env, "recipe.yaml", b"\xef\xbb\xbf" + TINY_TEXT.encode())
    cfg = merge(train.TrainConfig, str(recipe))
    assert cfg.run.seed == 42 and cfg.model.arch == "minigpt4"  # "model" read as itself, not as "\ufeffmodel"
    return True


def internal_error_in_train(env: Env) -> None:
    import train
    from minigpt4.datasets import builders

    def broken(*_, **__):
        raise RuntimeError("an internal bug, not a user mistake")

    original, builders.build_train_dataset = builders.build_train_dataset, broken
    try:
        train.main(["--cfg-path", TINY_RECIPE, "--options", *env.shared.tiny_data_options(),
                    f"run.output_dir={env.tmp / 'out'}"])
    finally:
        builders.build_train_dataset = original


def evaluate_with_files(files: dict[str, str], option: str, env: Env) -> tuple[int, str]:
    """evaluate_main after writing `files` into the case's folder ("{tmp}" in a text or the option is that folder)."""
    for name, text in files.items():
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{tmp}", str(env.tmp)))
    return evaluate_main(option.replace("{tmp}", str(env.tmp)), env)


POPE_SPLIT_FILES = {f"pope/{split}.jsonl": json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
                                                       "text": "Is there a dog?", "label": "yes"}) + "\n"
                    for split in ("random", "popular", "adversarial")}


def _case_id(option: str) -> str:
    key, value = option.split("=", 1)
    value = re.sub(r"[^\w.-]+", "_", value)[:16].strip("_")
    return f"{key}={value}"


def _train(option, *fragments):
    return Case(f"config/train/{_case_id(option)}", partial(train_main, option), Exits2(fragments))


def _evaluate(option, *fragments):
    return Case(f"config/evaluate/{_case_id(option)}", partial(evaluate_main, option), Exits2(fragments))


CONFIG_CASES = [
    _train("model.vit_pth=x", "unknown key 'model.vit_pth'", "vit_path"),  # the valid keys are listed
    _train("run.bogus=1", "bogus"),
    _train("datasets.caption_json.annpath=x", "datasets.caption_json.annpath", "unknown option"),
    _train("datasets.laoin.shards=x.tar", "datasets.laoin", "unknown dataset builder"),
    _train("run.batch_size=two", "run.batch_size"),
    _train("model.max_txt_len=long", "model.max_txt_len"),
    _train("model.max_txt_len=0", "model.max_txt_len must be >= 1"),
    _train("model.vib.beta=-1", "model.vib.beta must be >= 0"),
    _train("model.llm_path=/no/such/vicuna", "model.llm_path: path not found: /no/such/vicuna"),
    _train("datasets.caption_json.image_dir=/no/such/images", "datasets.caption_json.image_dir", "not found"),
    _train("model.mm_projector_type=mlp2x_gelu", "model.mm_projector_type = 'mlp2x_gelu'", "linear, vib"),
    _train("datasets.caption_json.on_bad_image=ignore", "datasets.caption_json.on_bad_image", "skip, error"),
    _evaluate("eval.bogus=1", "eval.bogus"),
    _evaluate("eval.batch_size=0", "eval.batch_size = 0; expected an integer >= 1"),
    _evaluate("eval.bootstrap=many", "eval.bootstrap"),
    _evaluate("eval.pope.splits=[randm]", "eval.pope.splits: unknown split 'randm'"),
    _evaluate("eval.pope.version=coco-2014", "eval.pope.version = 'coco-2014'", "coco-2023-08"),
    _evaluate("eval.prompt_format='USER: <Img><ImageHere></Img> Is there a dog? ASSISTANT:'",
              "eval.prompt_format", "has no {question} field"),
    _evaluate("eval.image_dir=/no/such/val2014", "eval.image_dir: path not found"),
    _evaluate("eval.on_bad_image=ignore", "eval.on_bad_image = 'ignore'; expected error or skip"),
    _evaluate("model.mm_projector_type=qformer", "model.mm_projector_type = 'qformer'"),
    _evaluate("eval.chair.num_images=0", "eval.chair.num_images = 0"),
    # benchmark files are read before the model is built: empty ones and names leaving eval.image_dir stop there
    Case("config/evaluate/pope-questions-empty",
         partial(evaluate_with_files, {**POPE_SPLIT_FILES, "pope/random.jsonl": ""}, "eval.pope.dir={tmp}/pope"),
         Exits2(("pope/random.jsonl: no questions",))),
    Case("config/evaluate/chair-image-list-empty", partial(evaluate_with_files, {"images.json": "[]"},
                                                           "eval.chair.images={tmp}/images.json"),
         Exits2(("images.json lists no images",))),
    Case("config/evaluate/chair-image-dir-without-images", partial(evaluate_with_files, {}, "eval.tasks=[chair]"),
         Exits2(("eval.image_dir:", "has no .jpg/.jpeg/.png file to sample CHAIR images from",))),
    _evaluate("eval.allow_outside_image_dir=maybe", "eval.allow_outside_image_dir"),
    _train("datasets.caption_json.allow_outside_image_dir=maybe",
           "datasets.caption_json.allow_outside_image_dir: expected true or false, got 'maybe'"),
    Case("config/evaluate/pope-image-outside-image-dir",
         partial(evaluate_with_files, {**POPE_SPLIT_FILES, "pope/popular.jsonl": json.dumps(
             {"question_id": 1, "image": "../../../home/x.jpg", "text": "Is there a dog?", "label": "yes"})},
                 "eval.pope.dir={tmp}/pope"),
         Exits2(("pope/popular.jsonl: question_id 1", "'../../../home/x.jpg' is outside the image folder",
                 "eval.allow_outside_image_dir"))),
    # learning rates and other float settings: in range and finite (NaN passes every `x <= 0` test)
    _train("run.init_lr=-1e-4", "run.init_lr must be a finite number > 0, got -0.0001"),
    _train("run.init_lr=0", "run.init_lr must be a finite number > 0, got 0"),
    _train("run.init_lr=nan", "run.init_lr must be a finite number > 0, got 'nan'"),
    _train("run.init_lr=.inf", "run.init_lr = inf; expected a finite number"),
    _train("run.init_lr=true", "run.init_lr must be a finite number > 0, got True"),
    _train("run.min_lr=-1e-6", "run.min_lr must be a finite number >= 0"),
    _train("run.warmup_lr=nan", "run.warmup_lr must be a finite number >= 0, got 'nan'"),
    _train("run.warmup_ratio=1.5", "run.warmup_ratio must be a finite number >= 0 and <= 1 or null"),
    _train("run.max_grad_norm=.nan", "run.max_grad_norm = nan; expected a finite number"),
    _train("run.adam_eps=0", "run.adam_eps must be a finite number > 0"),
    _train("model.vib.beta=nan", "model.vib.beta = nan; expected a finite number"),
    _train("model.vib.beta=inf", "model.vib.beta = inf; expected a finite number"),
    _train("datasets.caption_json.vis_processor.std=[0.26,.nan,0.27]",
           "datasets.caption_json.vis_processor.std[1] = nan; expected a finite number"),
    _evaluate("model.vib.beta=-inf", "model.vib.beta = -inf; expected a finite number"),
    _evaluate("eval.vis_processor.mean=[.nan,0.45,0.4]", "eval.vis_processor.mean[0] = nan"),
    # --options items
    Case("config/train/options-item-without-equals", partial(train_main, "run.init_lr"),  # would be null
         Exits2(("--options 'run.init_lr': expected key=value",))),
    Case("config/evaluate/options-item-without-equals", partial(evaluate_main, "eval.batch_size"),
         Exits2(("--options 'eval.batch_size': expected key=value",))),
    _train("run..init_lr=1e-4", "--options 'run..init_lr=1e-4': expected key=value"),
    _train("run.max_steps=[1,", "--options 'run.max_steps=[1,': the value is not valid YAML"),
    # recipe files
    Case("config/yaml/duplicate-key", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  seed: 42\n", "  seed: 42\n  seed: 7\n")),
         Exits2((f"recipe.yaml:{SEED_LINE + 1}:3: duplicate key 'seed' (in the mapping that starts on line "
                 f"{SEED_LINE - 1})",))),
    Case("config/yaml/duplicate-section", partial(train_main, "run.seed=1", recipe=TINY_TEXT + "run: {seed: 7}\n"),
         Exits2(("recipe.yaml:", "duplicate key 'run'"))),
    Case("config/yaml/syntax-error", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  max_epoch: 1\n", "  max_epoch: [1\n")), Exits2(("recipe.yaml:", "YAML syntax error"))),
    Case("config/yaml/tab-indent", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  seed: 42", "\tseed: 42")),
         Exits2((f"recipe.yaml:{SEED_LINE}:1: a tab character; YAML indents and separates with spaces only",))),
    Case("config/yaml/top-level-list", partial(train_main, "run.seed=1", recipe="- model: {}\n- run: {}\n"),
         Exits2(("recipe.yaml:1: the top level is a list; expected a mapping",))),
    Case("config/yaml/top-level-scalar", partial(train_main, "run.seed=1", recipe="tiny_cpu\n"),
         Exits2(("recipe.yaml:1: the top level is a single value ('tiny_cpu')",))),
    Case("config/yaml/not-utf8", partial(train_main, "run.seed=1", recipe=TINY_TEXT.encode().replace(
        b"# The embedded", b"# The \xe9mbedded")), Exits2(("recipe.yaml:1: not UTF-8 text",))),
    Case("config/yaml/evaluate-tab", partial(evaluate_main, "eval.batch_size=2", recipe="eval:\n\tbatch_size: 2\n"),
         Exits2(("recipe.yaml:2:1: a tab character",))),
    Case("config/yaml/utf8-bom", yaml_with_bom, Holds("read as UTF-8, the mark dropped")),
    # and a bug of this project's own is still a traceback, not a one-line "error:"
    Case("config/train/internal-error-keeps-traceback", internal_error_in_train,
         Raises(RuntimeError, ("an internal bug, not a user mistake",))),
]


# --------------------------------------------------------------------------------------------- checkpoints


def projector_file(width: int, llm_hidden: int, env: Env) -> None:
    path = env.tmp / "prerained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(width, 16), "llama_proj.bias": torch.zeros(width)}}, path)
    released_weights.load_minigpt4_projector(torch.nn.Linear(16, llm_hidden), path, llm_hidden=llm_hidden)


def lavis_file_as_projector(env: Env) -> None:
    path = env.tmp / "blip2_pretrained_flant5xxl.pth"
    lavis = {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4), "query_tokens": torch.zeros(1, 2, 4)}
    torch.save({"model": lavis}, path)
    released_weights.load_minigpt4_projector(torch.nn.Linear(4, 8), path, llm_hidden=8)


def trainable_file(source: str, target: str, edit: Callable[[dict], None], env: Env) -> list[str]:
    """A trainable.safetensors from a `source` projector model, edited, loaded into a `target` one."""
    tensors = {k: v.clone().contiguous() for k, v in ckpt.trainable_tensors(env.shared.model(source)).items()}
    edit(tensors)
    path = env.tmp / "final" / "trainable.safetensors"
    ckpt.save_state_file(path, tensors)
    return ckpt.load_trainable(env.shared.model(target), path)


def _set_nan(tensors: dict) -> None:
    tensors["projector.mu_p"][3] = float("nan")


class _ShellOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def code_executing_pickle(env: Env) -> None:
    marker = env.tmp / "ran"
    pickle.loads(pickle.dumps(_ShellOnUnpickle(marker)))  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    path = env.tmp / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2), "llama_proj.bias": _ShellOnUnpickle(marker)}}, path)
    ckpt.load_state_file(path)


def inf_in_pth(env: Env) -> None:
    torch.save({"model": {"llama_proj.weight": torch.tensor([[1.0, float("inf")]])}}, env.tmp / "proj.pth")
    ckpt.load_state_file(env.tmp / "proj.pth")


def not_safetensors(env: Env) -> None:
    (env.tmp / "trainable.safetensors").write_bytes(b"\x00\x01 this is not a safetensors header")
    ckpt.load_state_file(env.tmp / "trainable.safetensors")


def unknown_suffix(env: Env) -> None:
    (env.tmp / "model.ckpt").write_bytes(b"x")
    ckpt.load_state_file(env.tmp / "model.ckpt")


def full_ckpt_with_foreign_keys(env: Env) -> None:
    from minigpt4.models.loading import load_full_checkpoint

    save_file({"vision_tower.weight": torch.zeros(2)}, str(env.tmp / "full.safetensors"))
    load_full_checkpoint(env.shared.model("linear"), str(env.tmp / "full.safetensors"))


def built_with_projector_for_7b(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    path = env.tmp / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 32), "llama_proj.bias": torch.zeros(4096)}}, path)
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", projector_path=str(path)))


def _float64_with_1e300(key: str, tensors: dict) -> None:
    """Issue 13 item 3: finite in the file, inf once cast to the fp32 the model keeps it in."""
    for name in tensors:
        tensors[name] = tensors[name].double()
    tensors[key][0, 0] = 1e300


def released_projector_float64(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    weight, bias = torch.zeros(64, 32, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    weight[3, 1] = 1e300
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}}, env.tmp / "prerained_minigpt4.pth")
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", projector_path=str(env.tmp / "prerained_minigpt4.pth")))


def encoder_file_beyond_fp16(env: Env) -> None:
    """Assigned tensors keep the file's dtype and are cast by the builder afterwards (model.encoder_dtype)."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    state = {k: v.detach().clone().contiguous() for k, v in env.shared.model("vib").encoder.state_dict().items()}
    state["ln_vision.weight"][0] = 1e6  # fine in fp32, inf in fp16
    save_file(state, str(env.tmp / "encoder.safetensors"))
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", encoder_path=str(env.tmp / "encoder.safetensors"),
                                  encoder_dtype="fp16"))


def nan_logits_while_generating(env: Env) -> list[str]:
    """Finite weights can still give NaN logits (an activation overflowing fp16): they must not decode to ""."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    model = build_model(tiny_model_config(env.shared.tokenizer_dir, "linear"))
    with torch.no_grad():  # what an overflow does downstream of finite weights
        model.projector.llama_proj.weight.fill_(float("inf"))
    return model.generate(["<ImageHere> Is there a dog?"], torch.zeros(1, 3, 28, 28), max_new_tokens=3)


BEYOND_FP32 = ("(torch.float64) has values up to 1e+300", "beyond the range of torch.float32", "would become inf")


CHECKPOINT_CASES = [    Case("checkpoint/projector/7b-file-13b-llm", partial(projector_file, 4096, 5120),
         Raises(CheckpointError, ("prerained_minigpt4.pth", "projector is 4096-wide: this is a 7B",
                                  "the LLM is 5120-wide (13B)"))),
    Case("checkpoint/projector/13b-file-7b-llm", partial(projector_file, 5120, 4096),
         Raises(CheckpointError, ("5120-wide: this is a 13B (Vicuna-13B / Llama-2-13B)", "4096-wide (7B)"))),
    Case("checkpoint/projector/70b-file-7b-llm", partial(projector_file, 8192, 4096),
         Raises(CheckpointError, ("8192-wide: this is a 65B/70B", "Llama-2-70B", "4096-wide (7B)"))),
    Case("checkpoint/projector/7b-file-tiny-model-via-builder", built_with_projector_for_7b,
         Raises(CheckpointError, ("{tmp}/prerained_minigpt4_7b.pth", "this is a 7B", "the LLM is 64-wide"))),
    Case("checkpoint/projector/lavis-file-given", lavis_file_as_projector,
         Raises(CheckpointError, ("blip2_pretrained_flant5xxl.pth", "looks like a LAVIS BLIP-2/EVA checkpoint, "
                                  "not a MiniGPT-4 projector"))),
    Case("checkpoint/trainable/missing-key", partial(trainable_file, "vib", "vib", lambda t: t.pop("projector.mu_p")),
         Raises(CheckpointError, ("{tmp}/final/trainable.safetensors", "1 trainable parameter(s) not in the file: "
                                  "projector.mu_p"))),
    Case("checkpoint/trainable/extra-key",
         partial(trainable_file, "vib", "vib", lambda t: t.update({"projector.rotary.weight": torch.ones(2)})),
         Raises(CheckpointError, ("1 key(s) the model does not have: projector.rotary.weight",))),
    Case("checkpoint/trainable/wrong-shape",
         partial(trainable_file, "vib", "vib", lambda t: t.update({"projector.mu_p": torch.zeros(5120)})),
         Raises(CheckpointError, ("shape mismatch", "projector.mu_p: checkpoint (5120,) vs model (64,)"))),
    Case("checkpoint/trainable/nan-values", partial(trainable_file, "vib", "vib", _set_nan),
         Raises(CheckpointError, ("trainable.safetensors", "tensor 'projector.mu_p' contains NaN or inf"))),
    Case("checkpoint/trainable/linear-file-into-vib-model", partial(trainable_file, "linear", "vib", lambda t: None),
         Raises(CheckpointError, ("projector.llama_proj_std.weight", "the file holds a linear projector",
                                  "model.mm_projector_type: linear"))),
    Case("checkpoint/trainable/vib-file-into-linear-model", partial(trainable_file, "vib", "linear", lambda t: None),
         Raises(CheckpointError, ("the file holds a VIB projector", "model.mm_projector_type: vib"))),
    Case("checkpoint/pth/inf-values", inf_in_pth, Raises(CheckpointError, ("proj.pth", "'llama_proj.weight'",
                                                                           "NaN or inf"))),
    Case("checkpoint/pth/code-executing-pickle", code_executing_pickle,
         Raises(CheckpointError, ("prerained_minigpt4_7b.pth is not a plain tensor checkpoint",
                                  "nothing was executed"), after=lambda env: not (env.tmp / "ran").exists())),
    Case("checkpoint/file/not-safetensors", not_safetensors,
         Raises(CheckpointError, ("{tmp}/trainable.safetensors: not a readable safetensors file",))),
    Case("checkpoint/file/unknown-suffix", unknown_suffix,
         Raises(CheckpointError, ("model.ckpt: unknown checkpoint type '.ckpt'",))),
    Case("checkpoint/full/foreign-keys", full_ckpt_with_foreign_keys,
         Raises(CheckpointError, ("full.safetensors", "unexpected keys outside encoder/llm/projector",
                                  "vision_tower.weight"))),
    # values that become inf in the dtype the model keeps them in (issue 13 item 3): refused, naming the tensor
    Case("checkpoint/trainable/float64-beyond-fp32",
         partial(trainable_file, "vib", "vib", partial(_float64_with_1e300, "projector.llama_proj.weight")),
         Raises(CheckpointError, ("{tmp}/final/trainable.safetensors", "'projector.llama_proj.weight'", *BEYOND_FP32))),
    Case("checkpoint/projector/float64-beyond-fp32-via-builder", released_projector_float64,
         Raises(CheckpointError, ("{tmp}/prerained_minigpt4.pth", "'llama_proj.weight'", *BEYOND_FP32))),
    Case("checkpoint/encoder/beyond-fp16-after-cast", encoder_file_beyond_fp16,
         Raises(CheckpointError, ("not finite after loading them in the dtypes it runs in", "encoder.ln_vision.weight "
                                  "(float16)", "model.encoder_path = {tmp}/encoder.safetensors", "65504"))),
    Case("checkpoint/model/nan-logits-while-generating", nan_logits_while_generating,
         Raises(NonFiniteLogitsError, ("non-finite logits (NaN/inf) at generated token 1 for batch row(s) [0]",
                                       "would decode to empty strings"))),
]


# ------------------------------------------------------------------------- resume and output folders (issue 13)


TOY_ARGS = ["--iters", "4", "--epochs", "1", "--accum", "1", "--save-every", "1"]  # 4 steps, keep_last=2


def _toy_run(env: Env, *extra: str) -> dict:
    """The CPU toy of tests/_toy_train.py through the real Runner, into {tmp}/run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_toy_train", ROOT / "tests" / "_toy_train.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    return toy.main([str(env.tmp / "run"), *TOY_ARGS, *extra])[0]


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resume_past_damage(damage: Callable[[Path], None], fragment: str, env: Env) -> bool:
    _toy_run(env, "--stop-after", "3")
    damage(env.tmp / "run" / "checkpoints")
    records = _Records()
    logger = logging.getLogger("minigpt4.runners.runner")
    logger.addHandler(records)
    try:
        summary = _toy_run(env, "--resume")
    finally:
        logger.removeHandler(records)
    warning = " ".join(records.messages)
    assert fragment.replace("{tmp}", str(env.tmp)) in warning, warning
    assert f"resuming from {env.tmp}/run/checkpoints/step_00000002 instead" in warning, warning
    assert summary["completed"] and summary["global_step"] == 4
    return True


def resume_with_every_checkpoint_damaged(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    for step_dir in (env.tmp / "run" / "checkpoints").glob("step_*"):
        _truncate(step_dir / "state.pt")
    _toy_run(env, "--resume")


def resume_with_other_data_order(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    _toy_run(env, "--resume", "--accum", "2")


def fresh_run_over_old_run(env: Env) -> None:
    _toy_run(env, "--stop-after", "2")
    _toy_run(env)


def _raise(err: BaseException) -> Callable[..., None]:
    def fail(*_: Any) -> None:
        raise err
    return fail


def checkpoint_write_fails(writer: str, err: BaseException, at_step: int, env: Env) -> None:
    """The `writer` (checkpointing._write_torch / save_trainable) fails as a full or read-only disk does."""
    from minigpt4.runners import checkpointing

    real = getattr(checkpointing, writer)

    def write(*args: Any) -> None:  # (obj, path) or (path, tensors, metadata): fail for the step's files
        if any(isinstance(a, (str, os.PathLike)) and f"step_{at_step:08d}" in str(a) for a in args):
            raise err
        real(*args)

    with _replaced(checkpointing, writer, write):
        _toy_run(env)


def checkpoint_disk_too_full(env: Env) -> None:
    from minigpt4.runners import checkpointing

    with _replaced(checkpointing, "free_bytes", lambda path: 10_000):  # what statvfs says of a nearly full disk
        _toy_run(env)


def _no_half_written_checkpoint(env: Env) -> bool:
    root = env.tmp / "run" / "checkpoints"
    return not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def _train_argv(env: Env, *options: str) -> list[str]:
    return ["--cfg-path", TINY_RECIPE, "--options", *env.shared.tiny_data_options(),
            f"run.output_dir={env.tmp / 'out'}", "run.progress_bar=false", *options]


def train_resume_latest_nowhere(env: Env) -> tuple[int, str]:
    import train

    (env.tmp / "out" / "checkpoints").mkdir(parents=True)
    (env.tmp / "out" / "checkpoints" / "latest").write_text("step_00000004\n")  # its folder was deleted
    rc = train.main(_train_argv(env) + ["--resume"])
    assert not (env.tmp / "out" / "provenance.json").exists()  # a refused run leaves no record
    return rc, ""


def train_disk_full(env: Env) -> tuple[int, str]:
    import train
    from minigpt4.runners import checkpointing

    with _replaced(checkpointing, "free_bytes", lambda path: 10_000):
        rc = train.main(_train_argv(env, "run.max_steps=1", "run.save_every_steps=1"))
    assert not (env.tmp / "out" / "checkpoints" / "latest").exists()
    return rc, ""


def train_read_only_output_folder(env: Env) -> tuple[int, str]:
    import errno

    import train

    real_open = os.open

    def read_only(path, flags, *rest):  # the first write into the output folder is its lock file
        if str(path).endswith("/.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *rest)

    with _replaced(os, "open", read_only), _no_model_build():
        rc = train.main(_train_argv(env))
    return rc, ""


def _held_by_this_process(folder: Path):
    from minigpt4.common.output_dir import claim_output_dir

    return claim_output_dir(folder, "a concurrent run")


def train_into_a_folder_in_use(env: Env) -> tuple[int, str]:
    import train

    with _held_by_this_process(env.tmp / "out"), _no_model_build():
        rc = train.main(_train_argv(env))
    assert sorted(p.name for p in (env.tmp / "out").iterdir()) == []  # the holder's lock file is gone, nothing else
    return rc, ""


def evaluate_into_a_folder_in_use(env: Env) -> tuple[int, str]:
    import evaluate

    for folder in ("val2014", "annotations"):
        (env.tmp / folder).mkdir()
    (env.tmp / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    (env.tmp / "eval.yaml").write_text("eval: {}\n")
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={env.tmp}/out",
               "eval.device=cpu"]
    with _held_by_this_process(env.tmp / "out"), _no_model_build():
        rc = evaluate.main(["--cfg-path", str(env.tmp / "eval.yaml"), "--options", *options])
    return rc, ""


def stale_lock_file(env: Env) -> bool:
    from minigpt4.common.output_dir import claim_output_dir

    lock_file = env.tmp / "out" / ".lock"
    lock_file.parent.mkdir()
    lock_file.write_text("pid 999999999 on a-node-that-was-killed\n")  # no process holds its flock
    with claim_output_dir(env.tmp / "out", "run.output_dir"):
        assert lock_file.read_text().startswith(f"pid {os.getpid()} on ")
    assert not lock_file.exists()
    return True


def _without(name: str) -> Callable[[Path], None]:
    return lambda root: (root / "step_00000003" / name).unlink()


OUTPUT_CASES = [
    Case("checkpoint/resume/truncated-state-pt",
         partial(resume_past_damage, lambda root: _truncate(root / "step_00000003" / "state.pt"),
                 "{tmp}/run/checkpoints/step_00000003/state.pt is truncated or damaged"),
         Holds("passed over with a warning naming the file; resumed from step 2, the older one keep_last kept")),
    Case("checkpoint/resume/truncated-trainable-safetensors",
         partial(resume_past_damage, lambda root: _truncate(root / "step_00000003" / "trainable.safetensors"),
                 "step_00000003/trainable.safetensors is truncated or damaged (SafetensorError: "),
         Holds("passed over with a warning naming the file; resumed from step 2")),
    Case("checkpoint/resume/state-pt-missing",
         partial(resume_past_damage, _without("state.pt"), "step_00000003 lacks state.pt"),
         Holds("passed over with a warning; resumed from step 2")),
    Case("checkpoint/resume/latest-names-a-deleted-folder",
         partial(resume_past_damage, lambda root: shutil.rmtree(root / "step_00000003"),
                 "latest names 'step_00000003', which is not a checkpoint directory"),
         Holds("passed over with a warning; resumed from step 2")),
    Case("checkpoint/resume/every-checkpoint-damaged", resume_with_every_checkpoint_damaged,
         Raises(CheckpointError, ("no complete checkpoint to resume from in {tmp}/run/checkpoints",
                                  "{tmp}/run/checkpoints/step_00000002/state.pt is truncated or damaged",
                                  "{tmp}/run/checkpoints/step_00000001/state.pt is truncated or damaged"))),
    Case("checkpoint/resume/latest-points-nowhere/train", train_resume_latest_nowhere,
         Exits2(("no complete checkpoint to resume from", "latest names 'step_00000004', which is not a checkpoint "
                 "directory"), prefix="error: ")),
    Case("checkpoint/resume/other-data-order", resume_with_other_data_order,
         Raises(CheckpointError, ("cannot continue {tmp}/run/checkpoints/step_00000002 exactly",
                                  "grad_accum_steps: checkpoint 1, now 2"))),
    Case("checkpoint/resume/fresh-run-over-an-old-one", fresh_run_over_old_run,
         Raises(CheckpointError, ("{tmp}/run already holds checkpoints", "train.py --resume"))),
    Case("output/disk-full/checkpoint", checkpoint_disk_too_full,
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000001: No space left on device",
                                       "it needs about 74.1 KiB (9.8 KiB free there)",
                                       "previous checkpoint (none) is untouched", "run.keep_last"),
                after=_no_half_written_checkpoint)),
    Case("output/disk-full/while-writing-safetensors",
         partial(checkpoint_write_fails, "save_trainable",
                 SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), 2),
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000002: No space left on device",
                                       "needs about", "free there", "previous checkpoint (step_00000001) is untouched"),
                after=_no_half_written_checkpoint)),
    Case("output/read-only/checkpoint",
         partial(checkpoint_write_fails, "_write_torch", OSError(30, "Read-only file system"), 3),
         Raises(CheckpointWriteError, ("cannot write {tmp}/run/checkpoints/step_00000003: Read-only file system",
                                       "previous checkpoint (step_00000002) is untouched",
                                       "make {tmp}/run/checkpoints writable"), after=_no_half_written_checkpoint)),
    Case("output/disk-full/train", train_disk_full,
         Exits2(("/out/checkpoints/step_00000001: No space left on device; it needs about", "free there",
                 "continue with train.py --resume"), prefix="error: ")),
    Case("output/read-only/output-folder/train", train_read_only_output_folder,
         Exits2(("cannot write in the output folder", "(run.output_dir): Read-only file system"), prefix="error: ")),
    Case("output/in-use/train", train_into_a_folder_in_use,
         Exits2(("is in use by another run (pid", f"pid {os.getpid()} on ", "choose another run.output_dir"),
                prefix="error: ")),
    Case("output/in-use/evaluate", evaluate_into_a_folder_in_use,
         Exits2(("is in use by another run", f"pid {os.getpid()} on ", "choose another eval.output_dir"),
                prefix="error: ")),
    Case("output/stale-lock-of-a-dead-run", stale_lock_file,
         Holds("taken over: the kernel dropped the dead holder's flock; the file names the new pid, then is removed")),
]


# ------------------------------------------------------------------------------------------------ captions


def empty_caption(caption: str, on_bad_image: str, env: Env) -> int:
    images = env.tmp / "images"
    images.mkdir()
    for i in (1, 2):
        (images / f"{i:012d}.jpg").write_bytes(GOOD_RGB)
    ann = _write(env, "captions.json", json.dumps([{"image_id": 1, "caption": "a brown square"},
                                                    {"image_id": 2, "caption": caption}]))
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                                 on_bad_image=on_bad_image)
    assert len(dataset) == 1 and dataset[0]["id"] == "1" and dataset.empty_captions == ["2"]
    return len(dataset.empty_captions)


def _shard(env: Env, captions: dict[str, str]) -> str:
    path = env.tmp / "shard-0.tar"
    with tarfile.open(path, "w") as tar:
        for key, caption in captions.items():
            for name, data in ((f"{key}.jpg", GOOD_RGB), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def empty_caption_in_shard(on_bad_image: str, env: Env) -> int:
    shard = _shard(env, {"k1": "a brown square", "k2": "  ..  "})
    dataset = WebCaptionDataset(shard, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                                repeat=False, shuffle_buffer=0, on_bad_image=on_bad_image)
    samples = list(dataset)
    assert [s["id"] for s in samples] == ["k1"]
    return dataset.num_skipped


def long_caption(env: Env) -> bool:
    model = env.shared.model("vib")
    end_ids = model._ids(model.end_sym)
    long, short = "a red circle next to a blue square " * 40, "a red circle"
    text = model.build_training_text([None, None], [long, short])
    labels = [row[row != -100].tolist() for row in text.labels]
    assert len(labels[0]) == model.max_txt_len  # cut to max_txt_len tokens, as MiniGPT-4 does ...
    assert labels[0][-len(end_ids):] != end_ids  # ... the end symbol with it
    assert labels[1] == model._ids(short + model.end_sym) and labels[1][-len(end_ids):] == end_ids
    return True


CAPTION_CASES = [
    Case("caption/empty/error", partial(empty_caption, "", "error"),
         Raises(ValueError, ("{tmp}/captions.json: entry 1 (image_id 2) has an empty caption after cleaning ('')",
                             "on_bad_image: skip"))),
    Case("caption/only-punctuation/error", partial(empty_caption, " ... !\n", "error"),
         Raises(ValueError, ("captions.json: entry 1 (image_id 2) has an empty caption", "' ... !\\n'"))),
    Case("caption/empty/skip", partial(empty_caption, "", "skip"), Counted(1)),
    Case("caption/empty/webdataset-skip", partial(empty_caption_in_shard, "skip"), Counted(1)),
    Case("caption/empty/webdataset-error", partial(empty_caption_in_shard, "error"),
         Raises(BadSampleError, ("{tmp}/shard-0.tar:k2: empty caption after cleaning",))),
    Case("caption/longer-than-max_txt_len", long_caption, Holds("labels cut to max_txt_len, end symbol cut too")),
]


# ----------------------------------------------------------------------------------------------- tokenizers


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def tokenizer_without_pad(env: Env) -> bool:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    records = _Records()
    logger = logging.getLogger("minigpt4.models.minigpt4")
    logger.addHandler(records)
    try:
        model = build_model(tiny_model_config(env.shared.tokenizer_dir, "linear"))
    finally:
        logger.removeHandler(records)
    assert [m for m in records.messages if "pad" in m] == ["tokenizer has no pad token; using '<unk>' for padding "
                                                            "(masked out everywhere)"]
    tok = model.tokenizer
    assert tok.pad_token_id == tok.unk_token_id
    train_text = model.build_training_text([None, None], ["a red circle next to a small blue square", "a dog"])
    padded = train_text.attention_mask == 0
    assert padded[1].any() and not padded[0].any()  # right padding on the short row only
    assert (train_text.input_ids[padded] == tok.unk_token_id).all() and (train_text.labels[padded] == -100).all()
    gen_text = model.build_generation_text(["a <ImageHere> b", "a long prompt here <ImageHere> and more words"])
    padded = gen_text.attention_mask == 0
    assert padded[0, 0] and not padded[1].any()  # left padding for generation, masked
    return True


def tokenizer_without_bos(env: Env) -> None:
    from transformers import AutoTokenizer

    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    tokenizer = AutoTokenizer.from_pretrained(env.shared.tokenizer_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(env.tmp / "tokenizer-no-bos")
    build_model(tiny_model_config(str(env.tmp / "tokenizer-no-bos"), "linear"))


def not_a_tokenizer(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    (env.tmp / "vicuna-7b").mkdir()
    (env.tmp / "vicuna-7b" / "README.md").write_text("weights go here\n")
    build_model(tiny_model_config(str(env.tmp / "vicuna-7b"), "linear"))


def _tokenizer_with(files: dict[str, str], env: Env) -> str:
    """A copy of the tiny tokenizer folder with `files` (name: text) written over it."""
    import shutil

    folder = env.tmp / "tokenizer"
    shutil.copytree(env.shared.tokenizer_dir, folder)
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def tokenizer_files(files: dict[str, str], env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    build_model(tiny_model_config(_tokenizer_with(files, env), "linear"))


def train_with_tokenizer(files: dict[str, str], env: Env) -> tuple[int, str]:
    """train.py on the tiny recipe with a damaged tokenizer: found when the model is built, so "error: ..."."""
    import train

    options = env.shared.tiny_data_options() + [f"model.tokenizer_path={_tokenizer_with(files, env)}",
                                                f"run.output_dir={env.tmp / 'out'}"]
    return train.main(["--cfg-path", TINY_RECIPE, "--options", *options]), ""


NOT_A_TOKENIZER = {"tokenizer.json": json.dumps({"version": "1.0", "vocab": {"a": 0, "b": 1}})}

TOKENIZER_CASES = [
    Case("tokenizer/no-pad-token", tokenizer_without_pad, Holds("pads with <unk>, one warning, padding masked")),
    Case("tokenizer/no-bos-token", tokenizer_without_bos,
         Raises(ValueError, ("{tmp}/tokenizer-no-bos", "has no BOS token", "model.tokenizer_path"))),
    Case("tokenizer/folder-without-tokenizer", not_a_tokenizer,
         Raises(ConfigError, ("cannot load a tokenizer from {tmp}/vicuna-7b",))),
    # valid JSON, but not what transformers reads (it would fail with a bare KeyError / AttributeError)
    Case("tokenizer/tokenizer-json-not-a-tokenizer", partial(tokenizer_files, NOT_A_TOKENIZER),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json is not a Hugging Face tokenizer file (no 'model' "
                              "entry)",))),
    Case("tokenizer/tokenizer-json-a-list", partial(tokenizer_files, {"tokenizer.json": "[1, 2]"}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json: expected a JSON object, got list",))),
    Case("tokenizer/tokenizer-json-model-incomplete",
         partial(tokenizer_files, {"tokenizer.json": '{"model": {"type": "BPE"}}'}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json is not a Hugging Face tokenizer file (",))),
    Case("tokenizer/tokenizer-config-a-list", partial(tokenizer_files, {"tokenizer_config.json": "[]"}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer_config.json: expected a JSON object, got list",))),
    Case("tokenizer/tokenizer-json-not-a-tokenizer/train-cli", partial(train_with_tokenizer, NOT_A_TOKENIZER),
         Exits2(("tokenizer.json is not a Hugging Face tokenizer file",), prefix="error: ")),
]

CORPUS = IMAGE_CASES + JSON_CASES + CONFIG_CASES + CHECKPOINT_CASES + OUTPUT_CASES + CAPTION_CASES + TOKENIZER_CASES


# ---------------------------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def shared(tiny_tokenizer_dir, tmp_path_factory) -> Shared:
    return Shared(tiny_tokenizer_dir, tmp_path_factory.mktemp("hostile_shared"))


def _raised_by_this_project(err: BaseException) -> bool:
    """The frame that raised is ours: the error was recognised and explained, not hit deep inside a library."""
    last = traceback.extract_tb(err.__traceback__)[-1]
    path = Path(last.filename).resolve()
    return ROOT in path.parents and ".venv" not in path.parts and "site-packages" not in path.parts


def test_corpus_ids_are_unique():
    ids = [case.id for case in CORPUS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_hostile_input(case: Case, shared: Shared, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # provenance / CHAIR caches stay inside the test
    env = Env(tmp_path, shared)
    expect = case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.error) as info:
            case.act(env)
        message = str(info.value)
        for fragment in expect.fragments:
            assert fragment.replace("{tmp}", str(tmp_path)) in message, (fragment, message)
        assert _raised_by_this_project(info.value), "".join(traceback.format_tb(info.value.__traceback__)[-3:])
        if expect.after is not None:
            assert expect.after(env)
    elif isinstance(expect, Exits2):
        rc, _ = case.act(env)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith(expect.prefix) and "Traceback" not in err and err.count("\n") == 1, err
        for fragment in expect.fragments:
            assert fragment in err, (fragment, err)
    elif isinstance(expect, Counted):
        assert case.act(env) == expect.skipped
    else:
        value = case.act(env)
        assert value == EXPECTED_VALUES.get(case.id, True), value
