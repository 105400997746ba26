"""Which model the demo (and scripts/analyze_similarity.py) runs, and the second projector of compare mode.

Model choice, in order:
  1. `--cfg-path FILE`: the `model:` section of an eval/train YAML (or a file that *is* a model section),
     with `--options model.key=value` overrides on top.
  2. No config: `default_model_config()`. It uses the trained tiny shapes-world model at
     assets/shapes_base/model.yaml when that file exists (answers then highlight shapes-world object words);
     otherwise a tiny *random* MiniGPT-4 built from
     `minigpt4.common.tiny_models` with a tokenizer trained offline into a cache folder. The random model babbles,
     but every part of the page (upload, streaming chat, diagnostics, compare mode) works on it.
Relative weight paths in a config that do not exist from the working directory are looked up next to the
config file, then from the repository root, so the demo starts from any folder.
The image transform and the CHAIR vocabulary for highlighting come from the config's `eval.vis_processor` and
`eval.chair.synonyms` when it has them (eval configs do); otherwise from the model's input size and COCO's.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from minigpt4.common.config import PATH_KEYS, ConfigError, ModelConfig, merge, validate_model_config
from minigpt4.common.config_files import REPO_ROOT, eval_extras, load_model_config
from minigpt4.common.tiny_models import tiny_model_config, train_tokenizer
from minigpt4.models.checkpoints import load_state_file, load_trainable
from minigpt4.models.minigpt4 import MiniGPT4
from minigpt4.models.vib import VIBProjector, build_projector
from minigpt4.processors.image import build_image_processor

log = logging.getLogger(__name__)

SHAPES_BASE_YAML = REPO_ROOT / "assets" / "shapes_base" / "model.yaml"


def cache_dir() -> Path:
    """Where the demo keeps what it makes once (the tiny tokenizer): $MINIGPT4_DEMO_CACHE or ~/.cache/..."""
    env = os.environ.get("MINIGPT4_DEMO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minigpt4_adavib_demo"


def tiny_tokenizer_dir(cache: Path | None = None) -> str:
    """A tokenizer trained offline (about a second) the first time, reused afterwards."""
    folder = (cache or cache_dir()) / "tiny_tokenizer"
    if not (folder / "tokenizer.json").is_file():
        log.info("training the tiny demo tokenizer into %s", folder)
        # Train into a private folder and rename it into place: two demos starting at once never read a
        # half-written tokenizer.
        staging = folder.parent / f".tiny_tokenizer.{os.getpid()}.tmp"
        train_tokenizer(str(staging))
        try:
            os.rename(staging, folder)
        except OSError:  # another process got there first; its tokenizer is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def default_model_config(shapes_yaml: Path = SHAPES_BASE_YAML, cache: Path | None = None) -> DictConfig:
    """The model the demo runs without --cfg-path: the trained shapes-world base model when
    `shapes_yaml` exists, else a tiny random MiniGPT-4 (VIB projector) with an offline-trained tokenizer."""
    if Path(shapes_yaml).is_file():
        log.info("default model: %s", shapes_yaml)
        return load_model_config(shapes_yaml)
    log.info("default model: tiny random MiniGPT-4 (%s not found)", shapes_yaml)
    cfg = merge(ModelConfig, tiny_model_config(tiny_tokenizer_dir(cache), "vib"), where="tiny default model")
    validate_model_config(cfg)
    return cfg


def demo_extras(cfg_path: str | os.PathLike | None, shapes_yaml: Path = SHAPES_BASE_YAML,
                cache: Path | None = None) -> tuple[dict | None, str | None]:
    """(image transform config, CHAIR synonyms path) for the model `cfg_path` (or the default) selects;
    None means: infer the transform from the model / use COCO's synonyms."""
    if cfg_path is not None:
        return eval_extras(cfg_path)
    if Path(shapes_yaml).is_file():
        return eval_extras(shapes_yaml)[0], shapes_synonyms_file(cache)
    return None, None


def shapes_synonyms_file(cache: Path | None = None) -> str:
    """The shapes world's CHAIR vocabulary (one line per class: name, synonyms), written once to the cache,
    for highlighting the answers of the default shapes-world model."""
    from minigpt4.shapes.world.scenes import SHAPE_CLASSES

    path = (cache or cache_dir()) / "shapes_synonyms.txt"
    text = "".join(", ".join((c.name, *c.synonyms)) + "\n" for c in SHAPE_CLASSES)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    return str(path)


def shapes_example_images(cache: Path | None = None, count: int = 4, seed: int = 7) -> list[str]:
    """`count` shapes-world scenes (64 px, drawn as the world draws them), written once to the cache, for the
    page's example images when the default shapes-world model runs: nobody has to find an image to try it."""
    import numpy as np

    from minigpt4.shapes.world.scenes import render_image, sample_scene

    folder = (cache or cache_dir()) / f"shapes_examples_{seed}"
    paths = [folder / f"shapes_example_{i + 1}.png" for i in range(count)]
    if not all(p.is_file() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for path in paths:
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
            render_image(sample_scene(rng, 64, 0.9), 64, rng).save(staging)
            os.replace(staging, path)  # a second demo starting at once never reads half an image
    return [str(p) for p in paths]


def describe_model(cfg: DictConfig) -> str:
    """One line for the page header: which weights are loaded."""
    weights = [f"{k}={os.path.basename(str(cfg[k]).rstrip('/'))}" for k in PATH_KEYS
               if cfg[k] is not None and k != "tokenizer_path"]
    what = ", ".join(weights) if weights else "random weights (no checkpoint given)"
    return f"{cfg.arch}, {cfg.mm_projector_type} projector, template {cfg.prompt_template}: {what}"


def resolve_device(gpu_id: int | None) -> torch.device:
    if gpu_id is not None and gpu_id >= 0 and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def with_projector_checkpoint(model: MiniGPT4, path: str | os.PathLike) -> MiniGPT4:
    """A second MiniGPT-4 that shares `model`'s frozen encoder, LLM and tokenizer (the same module objects,
    no extra memory) and owns its own projector, loaded from this project's trainable.safetensors. The
    projector's kind follows the file, so a linear model can be compared with its VIB fine-tune and back.

    load_trainable is strict: a checkpoint of another projector type or LLM width fails with a message that
    lists the mismatched keys, instead of half-loading.
    """
    if not Path(path).is_file():
        raise ConfigError(f"--compare-ckpt: file not found: {path}")
    view = MiniGPT4(
        model.encoder, _projector_like(model.projector, path), model.llm, model.tokenizer, model.template,
        end_sym=model.end_sym, max_txt_len=model.max_txt_len,
    )
    load_trainable(view, path)
    return view.eval()


def _projector_like(projector: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """A copy of `projector`, or a projector of the kind the checkpoint holds (VIB: it has a std head)
    around a copy of the same linear mean head. load_trainable then checks every key and shape."""
    wants_vib = any(key.startswith("projector.llama_proj_std.") for key in load_state_file(path))
    is_vib = isinstance(projector, VIBProjector)
    if wants_vib == is_vib or not isinstance(projector.llama_proj, torch.nn.Linear):
        return copy.deepcopy(projector)  # same kind, or LLaVA's MLP head: nothing to switch
    mean_head = copy.deepcopy(projector.llama_proj)
    weight = mean_head.weight
    # A new VIB projector takes the reference model.vib settings: the view only runs in eval mode (z = μ, never
    # a loss), where S, β and α's weighting change nothing the demo shows.
    new = build_projector("vib" if wants_vib else "linear", projector.in_dim, projector.out_dim, mean_head=mean_head)
    return new.to(device=weight.device, dtype=weight.dtype)


def image_processor_for(model: MiniGPT4, vis_processor: dict | None = None):
    """The evaluation transform: `vis_processor` from the config when given, else the model's own input
    size (224 for EVA ViT-g, 28 for the tiny model; LLaVA's CLIP tower: pad to square at 336)."""
    if vis_processor is not None:
        return build_image_processor(vis_processor)
    vision = getattr(model.encoder, "vision_config", None)
    if vision is not None:  # BLIP-2 encoder (MiniGPT-4)
        return build_image_processor({"name": "blip2_image_eval", "image_size": int(vision.image_size)})
    return build_image_processor({"name": "clip_image_eval", "image_size": int(model.encoder.config.image_size)})
