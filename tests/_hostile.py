"""What the hostile-input corpus (tests/hostile/, run by tests/test_hostile_inputs.py) shares: the expected
answers a row can have, the per-row environment, the expensive pieces built once, the helpers more than one area
uses, and the check that runs one row against its expectation (`check_case`)."""
from __future__ import annotations

import contextlib
import io
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from minigpt4.datasets.caption import CaptionJsonDataset
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


# ------------------------------------------------------------------------------------ helpers of several areas


def encode_image(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write_file(env: Env, name: str, text: str | bytes) -> Path:
    """`text` (bytes as they are) into the row's folder as `name`."""
    path = env.tmp / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def caption_json(text: str | bytes, env: Env) -> int:
    """The training caption-JSON dataset over `text` and three good images (1, 2, 3): its length."""
    images = env.tmp / "images"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i:012d}.jpg").write_bytes(GOOD_RGB)
    ann = write_file(env, "captions.json", text)
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC))
    return len(dataset)


@contextlib.contextmanager
def no_model_build():
    """A config that slipped through validation must fail here, not start a whole training or evaluation."""
    from minigpt4.models import from_config as builder

    def refuse(*_, **__):
        raise AssertionError("the config was accepted and a model was about to be built")

    original, builder.build_model = builder.build_model, refuse
    try:
        yield
    finally:
        builder.build_model = original


class WarningRecords(logging.Handler):
    """Collects the messages of WARNING (and worse) log records."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


GOOD_RGB = encode_image(Image.new("RGB", (20, 14), (120, 60, 30)), "JPEG")


# ------------------------------------------------------------------------------------------------ the check


def raised_by_this_project(err: BaseException) -> bool:
    """The frame that raised is ours: the error was recognised and explained, not hit deep inside a library."""
    last = traceback.extract_tb(err.__traceback__)[-1]
    path = Path(last.filename).resolve()
    return ROOT in path.parents and ".venv" not in path.parts and "site-packages" not in path.parts


def check_case(case: Case, env: Env, capsys, expected_values: dict[str, Any]) -> None:
    """Run one row and check its answer; a Holds row's value must be expected_values[id] (default True)."""
    expect = case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.error) as info:
            case.act(env)
        message = str(info.value)
        for fragment in expect.fragments:
            assert fragment.replace("{tmp}", str(env.tmp)) in message, (fragment, message)
        assert raised_by_this_project(info.value), "".join(traceback.format_tb(info.value.__traceback__)[-3:])
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
        assert value == expected_values.get(case.id, True), value
