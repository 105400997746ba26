"""The typed `datasets.<builder>` sections: one dataclass schema per builder, merged by omegaconf
(`common.config.typed_section`) like the model, run and eval sections, each with one `validate(prefix)` that
raises ConfigError naming `datasets.<builder>.<key>`.

    datasets:
      caption_json: {ann_path: ..., image_dir: ..., on_bad_image: skip}   # -> CaptionJsonOptions
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from minigpt4.common.config import ConfigError
from minigpt4.common.files import NotRegularFileError, require_regular_file
from minigpt4.common.images import DEFAULT_MAX_PIXELS
from minigpt4.datasets.caption import ON_BAD_IMAGE_CHOICES
from minigpt4.datasets.webdata import expand_shards
from minigpt4.processors.image import build_image_processor
from minigpt4.processors.text import build_text_processor

# What a key holds, for the message about a value of the wrong type or out of range.
_EXPECTED = {
    "on_bad_image": f"one of {', '.join(ON_BAD_IMAGE_CHOICES)}",
    "max_pixels": "a positive integer or null",
    "allow_outside_image_dir": "true or false",
    "sample_ratio": "a number > 0",
    "shuffle_buffer": "an integer >= 0",
    "question_fraction": "a number",
    "image_size": "an integer",
}


def _check_path(prefix: str, key: str, value: Any, kind: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ConfigError(f"{prefix}.{key}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    if kind == "file":
        try:  # a FIFO or a link to /dev/zero would block the reader forever; say what the path is
            require_regular_file(path, "file")
        except NotRegularFileError as err:
            raise ConfigError(f"{prefix}.{key}: {err}") from None
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{prefix}.{key}: directory not found: {path}")
    if kind == "any" and not path.exists():
        raise ConfigError(f"{prefix}.{key}: path not found: {path}")
    return path


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


@dataclass
class DatasetOptions:
    """The options every builder accepts."""

    vis_processor: Optional[dict[str, Any]] = None  # null: builders.DEFAULT_VIS_PROCESSOR
    text_processor: Optional[dict[str, Any]] = None  # null: builders.DEFAULT_TEXT_PROCESSOR
    on_bad_image: str = "error"  # error | skip
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # decompression-bomb guard; null: no limit

    REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ()  # must be given, and exist on disk
    STREAMING: ClassVar[bool] = False  # webdataset shards (split by rank, mixed by sample_ratio), not map-style
    PROMPT_PER_BATCH: ClassVar[bool] = False  # one instruction drawn per batch for every row

    @classmethod
    def bad_value(cls, key: str, value: Any) -> str | None:
        expected = _EXPECTED.get(key.rpartition(".")[2])
        return f"{key}: expected {expected}, got {value!r}" if expected else None

    def validate(self, prefix: str) -> None:
        """Every check the types cannot express; ConfigError naming `prefix.key`."""
        for key in self.REQUIRED_PATHS:
            if getattr(self, key) in (None, "", []):
                raise ConfigError(f"{prefix}.{key}: required option missing")
        self.check_paths(prefix)
        if self.on_bad_image not in ON_BAD_IMAGE_CHOICES:
            raise ConfigError(self.bad_value(f"{prefix}.on_bad_image", self.on_bad_image))
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ConfigError(self.bad_value(f"{prefix}.max_pixels", self.max_pixels))
        for key, build in (("vis_processor", build_image_processor), ("text_processor", build_text_processor)):
            if getattr(self, key) is not None:
                try:
                    build(getattr(self, key))
                except ValueError as err:  # processor errors start with their own key ("name: ...")
                    raise ConfigError(f"{prefix}.{key}.{err}") from None

    def check_paths(self, prefix: str) -> None:
        """Builders registered elsewhere: their required paths must at least exist."""
        for key in self.REQUIRED_PATHS:
            _check_path(prefix, key, getattr(self, key), "any")


@dataclass
class CaptionJsonOptions(DatasetOptions):
    ann_path: Optional[str] = None  # JSON list of {image_id, caption}
    image_dir: Optional[str] = None
    # true lets an annotation's image_id be an absolute path or climb out of image_dir with ".." (refused by
    # default: such an entry would silently read a file from anywhere)
    allow_outside_image_dir: bool = False

    REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("ann_path", "image_dir")

    def check_paths(self, prefix: str) -> None:
        _check_path(prefix, "ann_path", self.ann_path, "file")
        _check_path(prefix, "image_dir", self.image_dir, "dir")


@dataclass
class CCSBUAlignOptions(DatasetOptions):
    storage: Optional[str] = None  # folder with filter_cap.json and image/
    prompt_path: Optional[str] = None  # text file, one instruction per line
    allow_outside_image_dir: bool = False  # as for caption_json

    REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("storage", "prompt_path")
    PROMPT_PER_BATCH: ClassVar[bool] = True

    def check_paths(self, prefix: str) -> None:
        storage = _check_path(prefix, "storage", self.storage, "dir")
        try:
            require_regular_file(storage / "filter_cap.json", "file")
        except NotRegularFileError as err:
            raise ConfigError(f"{prefix}.storage: {err}") from None
        if not (storage / "image").is_dir():
            raise ConfigError(f"{prefix}.storage: directory not found: {storage / 'image'}")
        _check_path(prefix, "prompt_path", self.prompt_path, "file")


@dataclass
class ShapesQAOptions(DatasetOptions):
    root: Optional[str] = None  # a shapes-world folder (minigpt4/shapes/world/scenes.py)
    split: str = "train"
    question_fraction: float = 0.4
    image_size: int = 64

    REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("root",)

    def validate(self, prefix: str) -> None:
        for key in ("vis_processor", "text_processor"):
            if getattr(self, key) is not None:  # the dataset feeds exactly the evaluation tensors
                raise ConfigError(f"{prefix}.{key}: not used by shapes_qa (it always applies the evaluation image "
                                  "processor at `image_size`); remove the key")
        super().validate(prefix)


@dataclass
class ShardOptions(DatasetOptions):
    """A streaming builder (laion, cc_sbu): webdataset shards, mixed with the others by sample_ratio."""

    shards: Any = None  # brace pattern ("/data/laion/{00000..01000}.tar") or a list of them
    sample_ratio: float = 1.0
    shuffle_buffer: int = 1000

    REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("shards",)
    STREAMING: ClassVar[bool] = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.sample_ratio > 0:
            raise ConfigError(self.bad_value(f"{prefix}.sample_ratio", self.sample_ratio))
        if self.shuffle_buffer < 0:
            raise ConfigError(self.bad_value(f"{prefix}.shuffle_buffer", self.shuffle_buffer))

    def check_paths(self, prefix: str) -> None:
        try:
            urls = expand_shards(self.shards)
        except ValueError as err:
            raise ConfigError(f"{prefix}.{err}") from None
        local = [u for u in urls if not _is_remote(u)]
        missing = [u for u in local if not Path(u).expanduser().exists()]
        if missing:
            raise ConfigError(f"{prefix}.shards: {len(missing)} of {len(urls)} shard files not found, "
                              f"e.g. {missing[0]}")
        try:
            for url in local:
                require_regular_file(Path(url).expanduser(), "shard")
        except NotRegularFileError as err:
            raise ConfigError(f"{prefix}.shards: {err}") from None
