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

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch.utils.data import ConcatDataset, Dataset, IterableDataset

from minigpt4.common.config import ConfigError, typed_section
from minigpt4.common.registry import Registry
from minigpt4.datasets.caption import CaptionJsonDataset, CCSBUAlignDataset, PromptPerBatchCollate, collate_samples
from minigpt4.datasets.options import (
    CaptionJsonOptions,
    CCSBUAlignOptions,
    DatasetOptions,
    ShapesQAOptions,
    ShardOptions,
)
from minigpt4.datasets.webdata import WebCaptionDataset, expand_shards, mix_by_ratio
from minigpt4.processors.image import build_image_processor
from minigpt4.processors.text import build_text_processor
from minigpt4.shapes.world.qa import ShapesQADataset

logger = logging.getLogger(__name__)

DATASETS: Registry[Callable[..., "BuiltDataset"]] = Registry("dataset")

# Used when a dataset's config names no processor: MiniGPT-4's training transforms (blip2_image_train at 224 px
# in MiniGPT-4 train_configs/minigpt4_stage2_finetune.yaml; 50 words is LAVIS BlipCaptionProcessor's max_words).
DEFAULT_VIS_PROCESSOR = {"name": "blip2_image_train", "image_size": 224}
DEFAULT_TEXT_PROCESSOR = {"name": "blip_caption", "max_words": 50}

# builder name -> its options schema (minigpt4/datasets/options.py), filled by `register_builder`; the tables
# below are views of it for the config validator and the tests.
DATASET_OPTIONS: dict[str, type[DatasetOptions]] = {}
DATASET_OPTION_KEYS: dict[str, set[str]] = {}
REQUIRED_PATH_KEYS: dict[str, list[str]] = {}


def register_builder(name: str, options: type[DatasetOptions]) -> Callable:
    """Register a builder `fn(options, *, rank, world_size, seed) -> BuiltDataset` and its options schema."""

    def add(fn: Callable) -> Callable:
        DATASETS.register(name)(fn)
        DATASET_OPTIONS[name] = options
        DATASET_OPTION_KEYS[name] = {f.name for f in dataclasses.fields(options)}
        REQUIRED_PATH_KEYS[name] = list(options.REQUIRED_PATHS)
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
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def dataset_options(name: str, cfg: Mapping[str, Any] | Any) -> DatasetOptions:
    """The `datasets.<name>` section as its typed, validated options; ConfigError naming
    `datasets.<name>.<key>` for an unknown builder or key, a wrong type, a missing path or a bad value."""
    prefix = f"datasets.{name}"
    if name not in DATASETS:
        raise ConfigError(f"{prefix}: unknown dataset builder {name!r}; valid: {', '.join(DATASETS.names())}")
    cfg = _to_plain(cfg)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of options, got {cfg!r}")
    options = typed_section(DATASET_OPTIONS[name], cfg, prefix=prefix)
    options.validate(prefix)
    return options


def validate_dataset_cfg(name: str, cfg: Mapping[str, Any] | Any) -> None:
    """ConfigError (a ValueError) naming the offending key (`datasets.<name>.<key>: ...`) for any problem."""
    dataset_options(name, cfg)


def validate_datasets(datasets_cfg: Mapping[str, Any] | Any) -> dict[str, DatasetOptions]:
    """The whole `datasets:` section: builder name -> its typed, validated options, and the rules between
    entries (one kind per run; a per-batch-prompt builder alone). ConfigError naming the key."""
    datasets_cfg = _to_plain(datasets_cfg)
    if not isinstance(datasets_cfg, Mapping) or not datasets_cfg:
        raise ConfigError(f"datasets: expected a mapping of builder name -> options with at least one entry "
                          f"(builders: {', '.join(DATASETS.names())}), got {datasets_cfg!r}")
    options = {name: dataset_options(name, cfg) for name, cfg in datasets_cfg.items()}
    streaming = {name for name, opts in options.items() if opts.STREAMING}
    if streaming and len(streaming) != len(options):
        raise ConfigError(f"datasets: cannot combine streaming ({', '.join(sorted(streaming))}) and map-style "
                          f"({', '.join(sorted(set(options) - streaming))}) datasets in one run")
    prompted = [name for name, opts in options.items() if opts.PROMPT_PER_BATCH]
    if prompted and len(options) > 1:
        raise ConfigError(f"datasets: {prompted[0]} draws one prompt per batch for every row, so it cannot share "
                          f"batches with {', '.join(n for n in options if n != prompted[0])}; train them in "
                          "separate runs")
    return options


def _processors(options: DatasetOptions) -> tuple[Callable, Callable]:
    vis = DEFAULT_VIS_PROCESSOR if options.vis_processor is None else options.vis_processor
    text = DEFAULT_TEXT_PROCESSOR if options.text_processor is None else options.text_processor
    return build_image_processor(vis), build_text_processor(text)


def _bad_image_options(options: DatasetOptions) -> dict[str, Any]:
    return {"on_bad_image": options.on_bad_image, "max_pixels": options.max_pixels}


@register_builder("caption_json", CaptionJsonOptions)
def build_caption_json(options: CaptionJsonOptions, *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(options)
    dataset = CaptionJsonDataset(options.ann_path, options.image_dir, vis, text, **_bad_image_options(options),
                                 allow_outside_image_dir=options.allow_outside_image_dir)
    return BuiltDataset(dataset, streaming=False)


@register_builder("cc_sbu_align", CCSBUAlignOptions)
def build_cc_sbu_align(options: CCSBUAlignOptions, *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(options)
    dataset = CCSBUAlignDataset(options.storage, options.prompt_path, vis, text, **_bad_image_options(options),
                                allow_outside_image_dir=options.allow_outside_image_dir)
    return BuiltDataset(dataset, streaming=False, prompts=dataset.prompts)


@register_builder("shapes_qa", ShapesQAOptions)
def build_shapes_qa(options: ShapesQAOptions, *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    """A shapes-world folder as captions mixed with POPE-worded yes/no questions, each with its instruction,
    in the form the shapes-world base model was trained on (see minigpt4/shapes/world/qa.py)."""
    dataset = ShapesQADataset(options.root, options.split, image_size=options.image_size,
                              question_fraction=options.question_fraction, seed=seed)
    return BuiltDataset(dataset, streaming=False)


def _build_shards(name: str, options: ShardOptions, rank: int, world_size: int, seed: int) -> BuiltDataset:
    vis, text = _processors(options)
    dataset = WebCaptionDataset(
        options.shards, vis, text, name=name, rank=rank, world_size=world_size, seed=seed,
        shuffle_buffer=options.shuffle_buffer, **_bad_image_options(options),
    )
    return BuiltDataset(dataset, streaming=True, sample_ratio=options.sample_ratio)


@register_builder("laion", ShardOptions)
def build_laion(options: ShardOptions, *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    return _build_shards("laion", options, rank, world_size, seed)


@register_builder("cc_sbu", ShardOptions)
def build_cc_sbu(options: ShardOptions, *, rank: int, world_size: int, seed: int) -> BuiltDataset:
    return _build_shards("cc_sbu", options, rank, world_size, seed)


def build_train_dataset(
    datasets_cfg: Mapping[str, Any] | Any, *, rank: int = 0, world_size: int = 1, seed: int = 42
) -> tuple[Dataset | IterableDataset, Callable]:
    """Validate and build every configured dataset; return (dataset, collate_fn) for a DataLoader."""
    options = validate_datasets(datasets_cfg)
    built = {name: DATASETS.get(name)(opts, rank=rank, world_size=world_size, seed=seed)
             for name, opts in options.items()}
    streaming = {name for name, b in built.items() if b.streaming}
    if streaming:
        names = list(built)
        dataset: Dataset | IterableDataset = (
            built[names[0]].dataset if len(names) == 1
            else mix_by_ratio([built[n].dataset for n in names], [built[n].sample_ratio for n in names], seed)
        )
        logger.info("training on streams %s with ratios %s", names, [built[n].sample_ratio for n in names])
        return dataset, collate_samples

    prompted = [name for name, b in built.items() if b.prompts]
    parts = [b.dataset for b in built.values()]
    dataset = parts[0] if len(parts) == 1 else CaptionConcatDataset(parts)
    logger.info("training on %s: %d samples", ", ".join(built), len(dataset))
    # seed=None: prompts come from torch's RNG, which the runner seeds per batch (reproducible across resumes)
    collate = PromptPerBatchCollate(built[prompted[0]].prompts) if prompted else collate_samples
    return dataset, collate


def files_to_record(datasets_cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """`datasets.<name>.<key>` -> path (for shards: the list of shard URLs) of every file the `datasets:` section
    reads, for provenance.json: ann_path, image_dir, prompt_path, cc_sbu_align's storage (its caption file and
    image folder) and the shards."""
    found: dict[str, Any] = {}
    for name, options in (_to_plain(datasets_cfg) or {}).items():
        options = options if isinstance(options, Mapping) else {}
        for key in ("ann_path", "image_dir", "prompt_path"):
            if options.get(key):
                found[f"datasets.{name}.{key}"] = str(options[key])
        if options.get("storage"):  # cc_sbu_align: the caption file is hashed, the image folder listed
            found[f"datasets.{name}.storage/filter_cap.json"] = os.path.join(options["storage"], "filter_cap.json")
            found[f"datasets.{name}.storage/image"] = os.path.join(options["storage"], "image")
        if options.get("shards"):
            found[f"datasets.{name}.shards"] = expand_shards(options["shards"])
    return found
