"""Config -> training dataset + collate function.

A config's `datasets:` section maps a builder name to its options, e.g.

    datasets:
      caption_json:
        ann_path: /data/lure/detail_5k.json
        image_dir: /data/coco/train2014
        vis_processor: {name: blip2_image_train, image_size: 224}
        text_processor: {name: blip_caption, max_words: 50}
        on_bad_image: skip

Map-style builders (caption_json, cc_sbu_align) are concatenated; the trainer shards them with a
DistributedSampler. Streaming builders (laion, cc_sbu) are split by rank here and mixed by `sample_ratio`.
One run cannot mix the two kinds.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Mapping

from torch.utils.data import ConcatDataset, Dataset, IterableDataset

from minigpt4.common.files import NotRegularFileError, require_regular_file
from minigpt4.common.registry import Registry
from minigpt4.datasets.caption import (
    ON_BAD_IMAGE_CHOICES,
    CaptionJsonDataset,
    CCSBUAlignDataset,
    PromptPerBatchCollate,
    collate_samples,
)
from minigpt4.datasets.images import DEFAULT_MAX_PIXELS
from minigpt4.datasets.shapes_qa import ShapesQADataset
from minigpt4.datasets.webdata import WebCaptionDataset, expand_shards, mix_by_ratio
from minigpt4.processors.image import build_image_processor
from minigpt4.processors.text import build_text_processor

logger = logging.getLogger(__name__)

DATASETS: Registry[Callable[..., "BuiltDataset"]] = Registry("dataset")

# Used when a dataset's config names no processor: the training transforms of SPEC §3.
DEFAULT_VIS_PROCESSOR = {"name": "blip2_image_train", "image_size": 224}
DEFAULT_TEXT_PROCESSOR = {"name": "blip_caption", "max_words": 50}

# Options every builder accepts; a builder adds its own when it registers (see `register_builder`).
COMMON_OPTION_KEYS = {"vis_processor", "text_processor", "on_bad_image", "max_pixels"}
_STREAM_KEYS = COMMON_OPTION_KEYS | {"shards", "sample_ratio", "shuffle_buffer"}
# Filled by `register_builder`; read by the config validator to report unknown keys and missing paths.
DATASET_OPTION_KEYS: dict[str, set[str]] = {}
# Map-style caption builders: true lets an annotation's image_id be an absolute path or climb out of the image
# folder with ".." (refused by default: such an entry would silently read a file from anywhere).
OUTSIDE_KEY = "allow_outside_image_dir"
REQUIRED_PATH_KEYS: dict[str, list[str]] = {}


def register_builder(name: str, *, option_keys: set[str], required_path_keys: list[str]) -> Callable:
    """Register a builder `fn(cfg, *, rank, world_size, seed) -> BuiltDataset` and its option tables.

    `option_keys` are the builder's own keys (COMMON_OPTION_KEYS are added); `required_path_keys` must be
    given and must exist on disk (builders with stricter layouts check more in `validate_dataset_cfg`).
    """

    def add(fn: Callable) -> Callable:
        DATASETS.register(name)(fn)
        DATASET_OPTION_KEYS[name] = COMMON_OPTION_KEYS | set(option_keys) | set(required_path_keys)
        REQUIRED_PATH_KEYS[name] = list(required_path_keys)
        return fn

    return add


@dataclass
class BuiltDataset:
    dataset: Dataset | IterableDataset
    streaming: bool
    prompts: list[str] | None = None
    sample_ratio: float = 1.0


class CaptionConcatDataset(ConcatDataset):
    """ConcatDataset that also reports the bad-image counts of its parts."""

    @property
    def num_skipped(self) -> int:
        return sum(getattr(d, "num_skipped", 0) for d in self.datasets)

    @property
    def num_bad_images(self) -> int:
        return sum(getattr(d, "num_bad_images", 0) for d in self.datasets)


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _check_path(prefix: str, key: str, value: Any, kind: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"{prefix}.{key}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    if kind == "file":
        try:  # a FIFO or a link to /dev/zero would block the reader forever; say what the path is
            require_regular_file(path, "file")
        except NotRegularFileError as err:
            raise ValueError(f"{prefix}.{key}: {err}") from None
    if kind == "dir" and not path.is_dir():
        raise ValueError(f"{prefix}.{key}: directory not found: {path}")
    if kind == "any" and not path.exists():
        raise ValueError(f"{prefix}.{key}: path not found: {path}")
    return path


def validate_dataset_cfg(name: str, cfg: Mapping[str, Any] | Any) -> None:
    """Raise ValueError naming the offending key (`datasets.<name>.<key>: ...`) for any problem."""
    prefix = f"datasets.{name}"
    if name not in DATASETS:
        raise ValueError(f"{prefix}: unknown dataset builder {name!r}; valid: {', '.join(DATASETS.names())}")
    cfg = _to_plain(cfg)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{prefix}: expected a mapping of options, got {cfg!r}")
    valid = DATASET_OPTION_KEYS[name]
    for key in cfg:
        if key not in valid:
            raise ValueError(f"{prefix}.{key}: unknown option; valid: {', '.join(sorted(valid))}")
    for key in REQUIRED_PATH_KEYS[name]:
        if cfg.get(key) in (None, "", []):
            raise ValueError(f"{prefix}.{key}: required option missing")

    if name == "caption_json":
        _check_path(prefix, "ann_path", cfg["ann_path"], "file")
        _check_path(prefix, "image_dir", cfg["image_dir"], "dir")
    elif name == "cc_sbu_align":
        storage = _check_path(prefix, "storage", cfg["storage"], "dir")
        try:
            require_regular_file(storage / "filter_cap.json", "file")
        except NotRegularFileError as err:
            raise ValueError(f"{prefix}.storage: {err}") from None
        if not (storage / "image").is_dir():
            raise ValueError(f"{prefix}.storage: directory not found: {storage / 'image'}")
        _check_path(prefix, "prompt_path", cfg["prompt_path"], "file")
    elif "shards" in REQUIRED_PATH_KEYS[name]:
        try:
            urls = expand_shards(cfg["shards"])
        except ValueError as err:
            raise ValueError(f"{prefix}.{err}") from None
        missing = [u for u in urls if not _is_remote(u) and not Path(u).expanduser().exists()]
        if missing:
            raise ValueError(f"{prefix}.shards: {len(missing)} of {len(urls)} shard files not found, e.g. {missing[0]}")
        try:
            for url in (u for u in urls if not _is_remote(u)):
                require_regular_file(Path(url).expanduser(), "shard")
        except NotRegularFileError as err:
            raise ValueError(f"{prefix}.shards: {err}") from None
    else:  # builders registered elsewhere: their required paths must at least exist
        for key in REQUIRED_PATH_KEYS[name]:
            _check_path(prefix, key, cfg[key], "any")

    if "sample_ratio" in cfg:
        ratio = cfg["sample_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not ratio > 0:
            raise ValueError(f"{prefix}.sample_ratio: expected a number > 0, got {ratio!r}")
    if "shuffle_buffer" in cfg:
        buffer = cfg["shuffle_buffer"]
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
            raise ValueError(f"{prefix}.shuffle_buffer: expected an integer >= 0, got {buffer!r}")

    if cfg.get("on_bad_image", "error") not in ON_BAD_IMAGE_CHOICES:
        raise ValueError(f"{prefix}.on_bad_image: expected one of {', '.join(ON_BAD_IMAGE_CHOICES)}, "
                         f"got {cfg['on_bad_image']!r}")
    if not isinstance(cfg.get(OUTSIDE_KEY, False), bool):
        raise ValueError(f"{prefix}.{OUTSIDE_KEY}: expected true or false, got {cfg[OUTSIDE_KEY]!r}")
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"{prefix}.max_pixels: expected a positive integer or null, got {max_pixels!r}")
    for key, build in (("vis_processor", build_image_processor), ("text_processor", build_text_processor)):
        if key in cfg:
            try:
                build(cfg[key])
            except ValueError as err:
                # processor errors start with their own key ("name: ...", "image_size: ...")
                raise ValueError(f"{prefix}.{key}.{err}") from None


def _processors(cfg: Mapping[str, Any]) -> tuple[Callable, Callable]:
    return (build_image_processor(cfg.get("vis_processor", DEFAULT_VIS_PROCESSOR)),
            build_text_processor(cfg.get("text_processor", DEFAULT_TEXT_PROCESSOR)))


def _bad_image_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"on_bad_image": cfg.get("on_bad_image", "error"), "max_pixels": cfg.get("max_pixels", DEFAULT_MAX_PIXELS)}


@register_builder("caption_json", option_keys={OUTSIDE_KEY}, required_path_keys=["ann_path", "image_dir"])
def build_caption_json(cfg: Mapping[str, Any], *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(cfg)
    dataset = CaptionJsonDataset(cfg["ann_path"], cfg["image_dir"], vis, text, **_bad_image_options(cfg),
                                 allow_outside_image_dir=cfg.get(OUTSIDE_KEY, False))
    return BuiltDataset(dataset, streaming=False)


@register_builder("cc_sbu_align", option_keys={OUTSIDE_KEY}, required_path_keys=["storage", "prompt_path"])
def build_cc_sbu_align(cfg: Mapping[str, Any], *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(cfg)
    dataset = CCSBUAlignDataset(cfg["storage"], cfg["prompt_path"], vis, text, **_bad_image_options(cfg),
                                allow_outside_image_dir=cfg.get(OUTSIDE_KEY, False))
    return BuiltDataset(dataset, streaming=False, prompts=dataset.prompts)


@register_builder("shapes_qa", option_keys={"split", "question_fraction", "image_size"}, required_path_keys=["root"])
def build_shapes_qa(cfg: Mapping[str, Any], *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    """A shapes-world folder as captions mixed with POPE-worded yes/no questions, each with its instruction,
    in the form the shapes-world base model was trained on (see minigpt4/datasets/shapes_qa.py)."""
    for key in ("vis_processor", "text_processor"):
        if key in cfg:  # the dataset feeds exactly the evaluation tensors; a train transform would be ignored
            raise ValueError(f"datasets.shapes_qa.{key}: not used by shapes_qa (it always applies the evaluation "
                             "image processor at `image_size`); remove the key")
    dataset = ShapesQADataset(cfg["root"], cfg.get("split", "train"), image_size=int(cfg.get("image_size", 64)),
                              question_fraction=float(cfg.get("question_fraction", 0.4)), seed=seed)
    return BuiltDataset(dataset, streaming=False)


def _build_shards(name: str, cfg: Mapping[str, Any], rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(cfg)
    dataset = WebCaptionDataset(
        cfg["shards"], vis, text, name=name, rank=rank, world_size=world_size, seed=seed,
        shuffle_buffer=cfg.get("shuffle_buffer", 1000), **_bad_image_options(cfg),
    )
    return BuiltDataset(dataset, streaming=True, sample_ratio=float(cfg.get("sample_ratio", 1.0)))


@register_builder("laion", option_keys=_STREAM_KEYS, required_path_keys=["shards"])
def build_laion(cfg: Mapping[str, Any], *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    return _build_shards("laion", cfg, rank, world_size, seed)


@register_builder("cc_sbu", option_keys=_STREAM_KEYS, required_path_keys=["shards"])
def build_cc_sbu(cfg: Mapping[str, Any], *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    return _build_shards("cc_sbu", cfg, rank, world_size, seed)


def build_train_dataset(
    datasets_cfg: Mapping[str, Any] | Any, *, rank: int = 0, world_size: int = 1, seed: int = 42
) -> tuple[Dataset | IterableDataset, Callable]:
    """Validate and build every configured dataset; return (dataset, collate_fn) for a DataLoader."""
    datasets_cfg = _to_plain(datasets_cfg)
    if not isinstance(datasets_cfg, Mapping) or not datasets_cfg:
        raise ValueError(f"datasets: expected a mapping of builder name -> options with at least one entry "
                         f"(builders: {', '.join(DATASETS.names())}), got {datasets_cfg!r}")
    built: dict[str, BuiltDataset] = {}
    for name, cfg in datasets_cfg.items():
        cfg = _to_plain(cfg) or {}
        validate_dataset_cfg(name, cfg)
        built[name] = DATASETS.get(name)(cfg, rank=rank, world_size=world_size, seed=seed)

    streaming = {name for name, b in built.items() if b.streaming}
    if streaming and len(streaming) != len(built):
        raise ValueError(f"datasets: cannot combine streaming ({', '.join(sorted(streaming))}) and map-style "
                         f"({', '.join(sorted(set(built) - streaming))}) datasets in one run")

    if streaming:
        names = list(built)
        dataset: Dataset | IterableDataset = (
            built[names[0]].dataset if len(names) == 1
            else mix_by_ratio([built[n].dataset for n in names], [built[n].sample_ratio for n in names], seed)
        )
        logger.info("training on streams %s with ratios %s", names, [built[n].sample_ratio for n in names])
        return dataset, collate_samples

    prompted = [name for name, b in built.items() if b.prompts]
    if prompted and len(built) > 1:
        raise ValueError(f"datasets: {prompted[0]} draws one prompt per batch for every row, so it cannot share "
                         f"batches with {', '.join(n for n in built if n != prompted[0])}; train them in separate runs")
    parts = [b.dataset for b in built.values()]
    dataset = parts[0] if len(parts) == 1 else CaptionConcatDataset(parts)
    logger.info("training on %s: %d samples", ", ".join(built), len(dataset))
    # seed=None: prompts come from torch's RNG, which the runner seeds per batch (reproducible across resumes)
    collate = PromptPerBatchCollate(built[prompted[0]].prompts) if prompted else collate_samples
    return dataset, collate
