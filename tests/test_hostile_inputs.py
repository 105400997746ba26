"""One corpus of hostile inputs, one table: every row is an input a real run can meet and the answer it gets.

An answer is one of
  * Raises(type, fragments): a clear error whose message names the file / key / line and what was expected;
    the exception must be raised by this project's code (its last frame is in this repository), never a
    traceback from deep inside torch, PIL or json;
  * Exits2(fragments): `train.py` / `evaluate.py` `main([...])` returns 2 and prints "config error: ..." naming
    the key, before any model or output exists;
  * Counted(n): the input is skipped because the config says skip, and the skip is counted (n);
  * Holds(description): the input is accepted and the result is right (checked by the row's own assertions).

Rows are grouped by area: images (dataset path with on_bad_image error/skip, eval ImageLoader error/skip, and a
whole POPE/CHAIR run with skip), JSON/JSONL files, configs, checkpoints, captions, tokenizers. Crash safety
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
import struct
import tarfile
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
from safetensors.torch import save_file

from minigpt4.common.config import ConfigError
from minigpt4.datasets.caption import CaptionJsonDataset
from minigpt4.datasets.images import BadImageError
from minigpt4.datasets.webdata import BadSampleError, WebCaptionDataset
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import read_predictions
from minigpt4.eval.tasks import ChairSettings, EvalSettings, ImageLoader, PopeSettings, run_chair, run_pope
from minigpt4.models import checkpoints as ckpt
from minigpt4.models import released_weights
from minigpt4.models.checkpoints import CheckpointError
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
            from minigpt4.common.tiny import tiny_model_config
            from minigpt4.models.builder import build_model

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
)


# -------------------------------------------------------------------------------------------- JSON / JSONL


def _write(env: Env, name: str, text: str) -> Path:
    path = env.tmp / name
    path.write_text(text)
    return path


def caption_json(text: str, env: Env) -> int:
    images = env.tmp / "images"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i:012d}.jpg").write_bytes(GOOD_RGB)
    ann = _write(env, "captions.json", text)
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC))
    return len(dataset)


def pope_questions(text: str, env: Env, require_text: bool = False) -> list[dict]:
    return pope_scorer.load_questions(_write(env, "random.jsonl", text), require_text=require_text)


def pope_answers(text: str, env: Env) -> list[str]:
    questions_path = _write(env, "random.jsonl", "".join(
        json.dumps({"question_id": q, "image": "a.jpg", "text": "?", "label": "yes"}) + "\n" for q in (1, 2)))
    questions = pope_scorer.load_questions(questions_path)
    return pope_scorer.match_answers(questions, questions_path, _write(env, "answers.jsonl", text))


def chair_captions(text: str, env: Env) -> list[dict]:
    return chair_scorer.load_captions(_write(env, "captions.jsonl", text))


def predictions(text: str, env: Env) -> dict:
    return read_predictions(str(_write(env, "pope_random_answers.jsonl", text)))


def chair_image_list(text: str, env: Env) -> list[str]:
    from minigpt4.eval.tasks import chair_image_list as image_list

    path = _write(env, "images.json", text)
    return image_list(EvalSettings(image_dir=str(env.tmp), chair=ChairSettings(images=str(path))))


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


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
]

EXPECTED_VALUES = {  # what the Holds rows above return
    "json/caption/duplicate-image-ids": 2,
    "jsonl/chair-captions/duplicate-image-id": [{"image_id": 3, "caption": "a"}, {"image_id": 3, "caption": "b"}],
}


# ------------------------------------------------------------------------------------------------- configs


@contextlib.contextmanager
def _no_model_build():
    """A config that slipped through validation must fail here, not start a whole training or evaluation."""
    from minigpt4.models import builder

    def refuse(*_, **__):
        raise AssertionError("the config was accepted and a model was about to be built")

    original, builder.build_model = builder.build_model, refuse
    try:
        yield
    finally:
        builder.build_model = original


def train_main(option: str, env: Env) -> tuple[int, str]:
    import train

    out = env.tmp / "out"
    options = env.shared.tiny_data_options() + [f"run.output_dir={out}", option]
    with _no_model_build():
        rc = train.main(["--cfg-path", TINY_RECIPE, "--options", *options])
    assert not out.exists()  # stopped before any model or output was made
    return rc, ""


def evaluate_main(option: str, env: Env) -> tuple[int, str]:
    import evaluate

    for folder in ("val2014", "annotations"):
        (env.tmp / folder).mkdir()
    out = env.tmp / "out"
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={out}", "eval.device=cpu",
               option]
    cfg = env.tmp / "schema_defaults.yaml"  # no --cfg-path would mean the embedded shapes-world config
    cfg.write_text("eval: {}\n")
    with _no_model_build():
        rc = evaluate.main(["--cfg-path", str(cfg), "--options", *options])
    assert not out.exists()
    return rc, ""


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
    tensors = {k: v.detach().clone().contiguous() for k, v in env.shared.model(source).trainable_state_dict().items()}
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
    from minigpt4.models.builder import load_full_checkpoint

    save_file({"vision_tower.weight": torch.zeros(2)}, str(env.tmp / "full.safetensors"))
    load_full_checkpoint(env.shared.model("linear"), str(env.tmp / "full.safetensors"))


def built_with_projector_for_7b(env: Env) -> None:
    from minigpt4.common.tiny import tiny_model_config
    from minigpt4.models.builder import build_model

    path = env.tmp / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 32), "llama_proj.bias": torch.zeros(4096)}}, path)
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", projector_path=str(path)))


CHECKPOINT_CASES = [
    Case("checkpoint/projector/7b-file-13b-llm", partial(projector_file, 4096, 5120),
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
    from minigpt4.common.tiny import tiny_model_config
    from minigpt4.models.builder import build_model

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

    from minigpt4.common.tiny import tiny_model_config
    from minigpt4.models.builder import build_model

    tokenizer = AutoTokenizer.from_pretrained(env.shared.tokenizer_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(env.tmp / "tokenizer-no-bos")
    build_model(tiny_model_config(str(env.tmp / "tokenizer-no-bos"), "linear"))


def not_a_tokenizer(env: Env) -> None:
    from minigpt4.common.tiny import tiny_model_config
    from minigpt4.models.builder import build_model

    (env.tmp / "vicuna-7b").mkdir()
    (env.tmp / "vicuna-7b" / "README.md").write_text("weights go here\n")
    build_model(tiny_model_config(str(env.tmp / "vicuna-7b"), "linear"))


TOKENIZER_CASES = [
    Case("tokenizer/no-pad-token", tokenizer_without_pad, Holds("pads with <unk>, one warning, padding masked")),
    Case("tokenizer/no-bos-token", tokenizer_without_bos,
         Raises(ValueError, ("{tmp}/tokenizer-no-bos", "has no BOS token", "model.tokenizer_path"))),
    Case("tokenizer/folder-without-tokenizer", not_a_tokenizer,
         Raises(ConfigError, ("cannot load a tokenizer from {tmp}/vicuna-7b",))),
]

CORPUS = IMAGE_CASES + JSON_CASES + CONFIG_CASES + CHECKPOINT_CASES + CAPTION_CASES + TOKENIZER_CASES


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
        assert err.startswith("config error: ") and "Traceback" not in err, err
        for fragment in expect.fragments:
            assert fragment in err, (fragment, err)
    elif isinstance(expect, Counted):
        assert case.act(env) == expect.skipped
    else:
        value = case.act(env)
        assert value == EXPECTED_VALUES.get(case.id, True), value
