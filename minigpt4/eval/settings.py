"""The `eval:` config section: typed settings (EvalSettings with its pope/chair/vcd/opera sub-sections), their one
validation (`validate_eval_settings`, run before any model is built; each task's protocol is resolved and checked
once, for the evaluation plan: minigpt4/eval/plan.py) and the benchmark files the section names
(`files_to_record`, for provenance.json and the fingerprints)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from minigpt4.common.config import ConfigError, check_paths
from minigpt4.common.dist import device_problem
from minigpt4.common.files import NotRegularFileError, require_regular_file
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval.decodings import check_decoding
from minigpt4.processors.image import build_image_processor

# AdaVIB's POPE/CHAIR system text and this harness's one-string prompt (protocol single-string-pope's, MiniGPT-4).
REFERENCE_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. Please answer the question. ")
REFERENCE_PROMPT = "{system}###Human: <Img><ImageHere></Img> {question}###Assistant:"
POPE_SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "vicuna_v0"  # the prompt family when no model says otherwise (minigpt4/eval/protocol_runs.py)


@dataclass
class PopeSettings:
    version: str = "coco-2023-08"  # coco-2023-08 (LLaVA-1.5 / AdaVIB) | coco-2023-10
    dir: Optional[str] = None  # folder with {split}.jsonl; default: the shipped files of `version`
    splits: list[str] = field(default_factory=lambda: list(POPE_SPLITS))
    # A named protocol (python -m minigpt4.eval.protocols): prompt, tokenization, generation, answer rule. The keys
    # below are null = the protocol's; a value other than the protocol's is recorded as NAME+overrides.
    protocol: str = "single-string-pope"
    rule: Optional[str] = None  # reference | first-sentence
    max_new_tokens: Optional[int] = None
    question_suffix: Optional[str] = None  # appended to every question (llava15-pope: "\nAnswer the question …")
    question_cleaning: Optional[str] = None  # none | blip_caption (adavib-pope)


@dataclass
class ChairSettings:
    # A named protocol (python -m minigpt4.eval.protocols): prompt, images, generation, sentence handling. The keys
    # below are null = the protocol's; a value other than the protocol's is recorded as NAME+overrides.
    protocol: str = "describe-sampled-500"
    images: Optional[str] = None  # .txt (one file name or id per line) or caption JSON; adavib-chair needs one
    num_images: Optional[int] = None  # sample size (describe-sampled-500) or cap of the list
    sample_seed: Optional[int] = None
    question: Optional[str] = None
    max_new_tokens: Optional[int] = None
    sentences: Optional[str] = None  # keep | drop-unfinished | drop-unk (CHAIR sentence handling)
    coco_annotations: Optional[str] = None  # folder with instances_*2014.json and captions_*2014.json
    synonyms: Optional[str] = None  # default: the reference 80-category synonyms


@dataclass
class VCDSettings:
    # Visual Contrastive Decoding (eval.decoding: vcd; minigpt4/eval/vcd.py), DAMO-NLP-SG/VCD's defaults
    alpha: float = 1.0  # cd_alpha: (1+α)·logit(v) − α·logit(v′)
    beta: Optional[float] = None  # cd_beta, the plausibility cut-off; null: the source's per task (POPE 0.2, CHAIR 0.1)
    noise_step: int = 500  # diffusion step t of v′, 0..999
    sample: bool = True  # the source samples; false: argmax of the VCD scores
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: none (the source passes top_k=None)
    seed: int = 55  # of v′'s noise (per image) and of each answer's draws (per item); the source's POPE script: 55


@dataclass
class OperaSettings:
    # OPERA (eval.decoding: opera; minigpt4/eval/opera.py), shikiw/OPERA's defaults
    setting: str = "default"  # default: threshold 15, 5 candidates | fast: threshold 25, 1 candidate (README)
    num_beams: int = 5  # the task's beams under OPERA
    scale_factor: float = 50.0  # attention scaled up before the column-wise product
    threshold: Optional[int] = None  # rollback after more than this many steps at one location; null: the setting's
    num_attn_candidates: Optional[int] = None  # candidates per beam, and rollbacks per position; null: the setting's
    penalty_weights: float = 1.0  # weight of the over-trust penalty (0: none)
    window_size: int = 512  # iterations kept for rollback; positions from here on are never rolled back to


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["pope", "chair"])
    output_dir: str = "out/eval"
    name: str = "model"  # model label in metrics.json and the results table
    image_dir: Optional[str] = None  # COCO val2014 images
    # true: a POPE `image` / CHAIR list entry may be an absolute path or climb out of image_dir with ".."
    allow_outside_image_dir: bool = False
    batch_size: int = 8
    device: str = "auto"
    system: Optional[str] = None  # null: each task's protocol's system text, prompt format and beams
    prompt_format: Optional[str] = None  # {system}, {question}, <ImageHere> once
    vis_processor: dict[str, Any] = field(default_factory=lambda: {"name": "blip2_image_eval", "image_size": 224})
    num_beams: Optional[int] = None
    decoding: str = "greedy"  # greedy: each protocol's own decoding (greedy or its beams) | vcd | opera (below)
    vcd: VCDSettings = field(default_factory=VCDSettings)
    opera: OperaSettings = field(default_factory=OperaSettings)
    sort_by_length: bool = True
    use_cache: bool = True  # KV cache during generation (switch off only to measure what it saves)
    feature_cache: Optional[str] = None  # folder of cached encoder outputs; null: encode every time
    on_bad_image: str = "error"  # error | skip
    bootstrap: int = 1000  # resamples for the confidence intervals (0: none)
    seed: int = 0
    # Mirrors of the results, as training's run.tensorboard / run.wandb (minigpt4/eval/eval_logging.py): metrics
    # and per-item tables to {output_dir}/tensorboard, and to a W&B run (offline unless WANDB_MODE says otherwise).
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "minigpt4-adavib"
    pope: PopeSettings = field(default_factory=PopeSettings)
    chair: ChairSettings = field(default_factory=ChairSettings)


def validate_eval_settings(ev) -> None:
    """The `eval:` section's one validation, run before the model is built (a bad batch size would otherwise fail
    only after loading 7B weights). `ev` is the section (a DictConfig or an EvalSettings); raises ConfigError naming
    the key. The protocol keys (prompt, beams, new tokens, rule, images) are checked where each task's protocol is
    resolved, once, for the plan (minigpt4/eval/plan.py, protocol_runs.resolve_run)."""
    _check_tasks_and_sources(ev)
    for key, value, low in [("batch_size", ev.batch_size, 1), ("bootstrap", ev.bootstrap, 0)]:
        if value < low:
            raise ConfigError(f"eval.{key} = {value}; expected an integer >= {low}")
    if (problem := device_problem(ev.device, "eval.device")) is not None:  # cuda without a GPU: before anything
        raise ConfigError(problem)
    vis = OmegaConf.to_container(ev.vis_processor) if isinstance(ev.vis_processor, DictConfig) else ev.vis_processor
    try:
        build_image_processor(vis)
    except ValueError as err:
        raise ConfigError(f"eval.vis_processor.{err}") from None
    if "pope" in ev.tasks:
        _check_pope_splits(ev)
    check_decoding(ev)


def _check_tasks_and_sources(ev) -> None:
    """eval.tasks, eval.on_bad_image, and the folders each task reads must exist."""
    unknown = sorted(set(ev.tasks) - {"pope", "chair"})
    if unknown or not ev.tasks:
        raise ConfigError(f"eval.tasks = {list(ev.tasks)}; expected a non-empty list of: pope, chair")
    if ev.image_dir is None:
        raise ConfigError("eval.image_dir must name the folder of evaluation images (e.g. COCO val2014)")
    check_paths(ev, ("image_dir",), prefix="eval")
    if ev.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"eval.on_bad_image = {ev.on_bad_image!r}; expected error or skip")
    if "chair" in ev.tasks:
        if ev.chair.coco_annotations is None:
            raise ConfigError("eval.chair.coco_annotations must name the folder with the COCO 2014 "
                              "instances_*/captions_* files (CHAIR ground truth)")
        check_paths(ev.chair, ("coco_annotations", "images", "synonyms"), prefix="eval.chair")
    if "pope" in ev.tasks:
        check_paths(ev.pope, ("dir",), prefix="eval.pope")


def _check_pope_splits(ev) -> None:
    splits = list(ev.pope.splits)
    if not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"eval.pope.splits = {splits}; expected a non-empty list without repeats "
                          f"(of {', '.join(POPE_SPLITS)} for the shipped files)")
    for split in splits:
        if ev.pope.dir is None and split not in POPE_SPLITS:
            raise ConfigError(f"eval.pope.splits: unknown split {split!r}; the shipped question files are "
                              f"{', '.join(POPE_SPLITS)} (or set eval.pope.dir)")
        try:
            path = pope_question_file(ev.pope, split)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not os.path.exists(path):
            where = "eval.pope.dir" if ev.pope.dir is not None else f"eval.pope.version = {ev.pope.version!r}"
            raise ConfigError(f"eval.pope.splits: no questions file {path} for split {split!r} ({where})")
        try:  # a FIFO or a link to /dev/zero: say what it is (reading it would block)
            require_regular_file(path, f"POPE questions file for split {split!r}")
        except NotRegularFileError as err:
            raise ConfigError(f"eval.pope.splits: {err}") from None


def pope_question_file(settings: PopeSettings, split: str) -> str:
    if settings.dir is not None:
        return os.path.join(settings.dir, f"{split}.jsonl")
    shipped = resources.files("minigpt4.eval") / "data" / "pope" / settings.version / f"{split}.jsonl"
    if not shipped.is_file():
        raise ValueError(f"eval.pope.version = {settings.version!r}: no shipped file {shipped}; "
                         "expected coco-2023-08 or coco-2023-10, or set eval.pope.dir")
    return str(shipped)


def files_to_record(settings: EvalSettings) -> dict[str, str]:
    """`eval.<key>` -> path of every benchmark file the `eval:` section reads, for provenance.json: image_dir,
    the POPE question files of the splits run, CHAIR's image list, annotation files and synonyms."""
    found: dict[str, str] = {}
    if settings.image_dir:
        found["eval.image_dir"] = str(settings.image_dir)
    if "pope" in settings.tasks:
        for split in settings.pope.splits or POPE_SPLITS:
            found[f"eval.pope.{split}"] = pope_question_file(settings.pope, split)
    if "chair" in settings.tasks:
        chair = settings.chair
        if chair.images:
            found["eval.chair.images"] = str(chair.images)
        if chair.coco_annotations:
            found.update(_coco_annotation_files(str(chair.coco_annotations)))
        found["eval.chair.synonyms"] = str(chair.synonyms or
                                           resources.files("minigpt4.eval") / "data" / "chair_synonyms.txt")
    return found


def _coco_annotation_files(folder: str) -> dict[str, str]:
    """The instances/captions files CHAIR reads (hashed), not the whole annotations folder (GBs of others)."""
    try:
        files = chair_scorer.find_annotation_files(folder)
    except FileNotFoundError:
        return {"eval.chair.coco_annotations": folder}
    return {f"eval.chair.coco_annotations/{p.name}": str(p) for kind in ("instances", "captions") for p in files[kind]}
