"""Hostile images: unreadable and odd-mode images in training and evaluation (on_bad_image error and skip), a
whole POPE / CHAIR run with skip, image names outside the image folder, and paths that are not regular files
(FIFOs, links to /dev/zero, folders) wherever a user names a file."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
import zlib
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from _hostile import (
    EVAL_PROC,
    GOOD_RGB,
    SIZE,
    TEXT_PROC,
    TRAIN_PROC,
    Case,
    Counted,
    Env,
    Holds,
    Raises,
    caption_json,
    encode_image,
    write_file,
)
from PIL import Image

from minigpt4.common.config import ConfigError
from minigpt4.common.files import NotRegularFileError
from minigpt4.common.images import BadImageError
from minigpt4.common.jsonfiles import DataFileError
from minigpt4.datasets.caption import CaptionJsonDataset
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.benchmark_runs import ImageLoader
from minigpt4.eval.plan import plan_tasks
from minigpt4.eval.protocol_runs import resolve_run
from minigpt4.eval.settings import ChairSettings, EvalSettings, PopeSettings
from minigpt4.eval.task_runs import run_chair, run_pope
from minigpt4.models import checkpoints as ckpt
from minigpt4.models.checkpoints import CheckpointError
from minigpt4.processors import build_image_processor, build_text_processor


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (CRC fixed) claims width x height: a decompression bomb's header, 70 bytes."""
    data = bytearray(encode_image(Image.new("L", (1, 1)), "PNG"))
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
    return encode_image(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def _palette_png() -> bytes:
    image = Image.new("P", (6, 6), 0)
    image.putpalette([200, 10, 10, 10, 200, 10] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    return encode_image(image, "PNG")


_NOISE_JPEG = encode_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                           "JPEG")
BAD_IMAGES = {  # name: (bytes, what the error says)
    "zero-bytes": (b"", "empty"),
    "truncated": (_NOISE_JPEG[: len(_NOISE_JPEG) // 2], "cannot decode image"),
    "not-an-image": (b"a dog on a sofa\n", "not a recognised image format"),
    "bomb-20000x20000": (_png_header_claiming(20000, 20000), "decompression-bomb"),
}
GOOD_IMAGES = {
    "grayscale": encode_image(Image.new("L", (9, 7), 90), "PNG"),
    "rgba": encode_image(Image.new("RGBA", (9, 7), (0, 0, 255, 100)), "PNG"),
    "cmyk": encode_image(Image.new("CMYK", (9, 7), (0, 255, 255, 0)), "JPEG"),
    "palette": _palette_png(),
    "16-bit": encode_image(Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)), "PNG"),
    "exif-rotated": _exif_rotated_jpeg(),
    "1x1": encode_image(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
}


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
    result = run_pope(_YesModel(), plan_tasks(settings), str(env.tmp / "out"))
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
    result = run_chair(_YesModel(), plan_tasks(settings), str(env.tmp / "out"))
    assert result["n_captions"] == 1 and result["chair_s"] == 0.0  # the dog is there: nothing hallucinated
    return result["skipped"]["images"]


def _pope_file(env: Env, image: str) -> EvalSettings:
    """A one-question POPE split whose question names `image` ("{tmp}" is the case's folder)."""
    (env.tmp / "pope").mkdir()
    row = {"question_id": 1, "image": image.replace("{tmp}", str(env.tmp)), "text": "Is there a dog?", "label": "yes"}
    (env.tmp / "pope" / "random.jsonl").write_text(json.dumps(row) + "\n")
    (env.tmp / "val2014").mkdir()
    return EvalSettings(tasks=["pope"], image_dir=str(env.tmp / "val2014"), bootstrap=0, vis_processor=dict(EVAL_PROC),
                        pope=PopeSettings(dir=str(env.tmp / "pope"), splits=["random"]))


def pope_image_outside(image: str, env: Env) -> None:
    from minigpt4.eval.benchmark_runs import pope_items

    settings = _pope_file(env, image)
    pope_items(settings, "random", resolve_run(settings, "pope", "vicuna_v0"))


def pope_image_outside_allowed(env: Env) -> bool:
    (env.tmp / "elsewhere").mkdir()
    (env.tmp / "elsewhere" / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    settings = _pope_file(env, "../elsewhere/COCO_val2014_000000000001.jpg")
    settings.allow_outside_image_dir = True
    result = run_pope(_YesModel(), plan_tasks(settings), str(env.tmp / "out"))
    assert result["n"] == 1 and "skipped" not in result  # the file outside image_dir was read and answered
    return True


def chair_list_image_outside(env: Env) -> None:
    from minigpt4.eval.benchmark_runs import chair_items

    (env.tmp / "val2014").mkdir()
    path = write_file(env, "images.json", json.dumps([{"image_id": "../../COCO_val2014_000000000001.jpg"}]))
    settings = EvalSettings(image_dir=str(env.tmp / "val2014"), chair=ChairSettings(images=str(path)))
    chair_items(settings, resolve_run(settings, "chair", "vicuna_v0"))


def caption_image_outside(text: str, env: Env) -> int:
    return caption_json(text, env)  # (tests/_hostile.py: the JSON rows read caption JSON through it too)


def caption_image_outside_allowed(env: Env) -> bool:
    (env.tmp / "images").mkdir()
    (env.tmp / "elsewhere").mkdir()
    (env.tmp / "elsewhere" / "photo.jpg").write_bytes(GOOD_RGB)
    ann = write_file(env, "captions.json",
                     json.dumps([{"image_id": "../elsewhere/photo", "caption": "a brown square"}]))
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
