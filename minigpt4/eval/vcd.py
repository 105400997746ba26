"""Visual Contrastive Decoding as a decoding option of the evaluation (`eval.decoding: vcd`, parameters `eval.vcd`).

    eval.decoding = greedy   each task's protocol decodes as its source did (greedy, or its beam search)
    eval.decoding = vcd      VCD (minigpt4/models/contrastive_decoding.py) with eval.vcd.*, the same prompts,
                             images, stop rules and scorers; labelled NAME+vcd(α=…,β=…,t=…,sample)

Defaults are DAMO-NLP-SG/VCD's: α = 1 and noise step 500 (experiments/eval/object_hallucination_vqa_llava.py and
experiments/cd_scripts/llava1.5_pope.bash agree); β = 0.2 for POPE, as llava1.5_pope.bash runs it, and 0.1 for CHAIR,
the eval script's and vcd_sample.py's default (the source has no CHAIR script); sampling at temperature 1, top_p 1,
no top-k, as the eval script calls generate (do_sample=True, top_k=None).

Randomness is seeded per image and per item, never per batch: the noise of v′ from eval.vcd.seed and the image's
preprocessed pixels (the same v′ for every question about an image), each answer's draws from eval.vcd.seed and the
item key. So a rerun, a resume, another batch size or rank count gives the same answers. The source draws both from
one global RNG (set_seed), so its exact draws cannot be reproduced here, only their distribution.

With `eval.feature_cache`, the distorted copies are cached in their own namespace (the clean one plus the
distortion's settings): a cached run can never hand clean features to the distorted stream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Optional

import torch

from minigpt4.common.config import ConfigError
from minigpt4.eval.feature_cache import CachedFeatureSource, FeatureCache, encoder_namespace
from minigpt4.models.contrastive_decoding import NOISE_STEPS, ContrastiveDecoding, distort_image, generate_contrastive

SOURCE = ("DAMO-NLP-SG/VCD: vcd_utils/vcd_sample.py, vcd_utils/vcd_add_noise.py, "
          "experiments/eval/object_hallucination_vqa_llava.py, experiments/cd_scripts/llava1.5_pope.bash")
SOURCE_BETA = {"pope": 0.2, "chair": 0.1}  # eval.vcd.beta null: the source's value for the task (module docstring)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # shown in the label only when changed


def check_vcd(ev) -> None:
    """Every eval.vcd key, whatever the decoding (a bad value is refused, not kept for later); ConfigError naming
    the key. eval.decoding itself is checked by minigpt4/eval/decodings.py."""
    vcd = ev.vcd
    checks = [
        ("alpha", vcd.alpha, math.isfinite(vcd.alpha) and vcd.alpha >= 0, "a finite number >= 0 (0: plain decoding)"),
        ("beta", vcd.beta, vcd.beta is None or 0 < vcd.beta <= 1, "a number in (0, 1], or null for the source's "
                                                                   f"value per task ({SOURCE_BETA})"),
        ("noise_step", vcd.noise_step, 0 <= vcd.noise_step < NOISE_STEPS,
         f"a diffusion step in 0..{NOISE_STEPS - 1} (the source's schedule has {NOISE_STEPS})"),
        ("temperature", vcd.temperature, math.isfinite(vcd.temperature) and vcd.temperature > 0, "a number > 0"),
        ("top_p", vcd.top_p, 0 < vcd.top_p <= 1, "a number in (0, 1]"),
        ("top_k", vcd.top_k, vcd.top_k >= 0, "an integer >= 0 (0: no top-k)"),
    ]
    for key, value, good, expected in checks:
        if not good:
            raise ConfigError(f"eval.vcd.{key} = {value}; expected {expected}")


def resolve_vcd(ev, task: str) -> ContrastiveDecoding:
    """The VCD parameters `task` runs with under eval.decoding = vcd."""
    check_vcd(ev)
    vcd = ev.vcd
    return ContrastiveDecoding(alpha=float(vcd.alpha), beta=float(SOURCE_BETA[task] if vcd.beta is None else vcd.beta),
                               noise_step=int(vcd.noise_step), sample=bool(vcd.sample),
                               temperature=float(vcd.temperature), top_p=float(vcd.top_p), top_k=int(vcd.top_k),
                               seed=int(vcd.seed))


def vcd_label(decoding: ContrastiveDecoding) -> str:
    """vcd(α=1,β=0.2,t=500,sample) — with T / top_p / top_k when changed, `argmax` when not sampling."""
    parts = [f"α={decoding.alpha:g}", f"β={decoding.beta:g}", f"t={decoding.noise_step}"]
    parts.append("sample" if decoding.sample else "argmax")
    if decoding.sample:
        names = {"temperature": "T", "top_p": "top_p", "top_k": "top_k"}
        parts += [f"{names[key]}={getattr(decoding, key):g}" for key, default in SAMPLING_DEFAULTS.items()
                  if getattr(decoding, key) != default]
    return f"vcd({','.join(parts)})"


def vcd_record(decoding: ContrastiveDecoding) -> dict[str, Any]:
    """For metrics.json: every parameter under its eval.vcd name, and the source."""
    return {"name": "vcd", **dataclasses.asdict(decoding), "source": SOURCE}


def _seed(*parts: Any) -> int:
    text = "|".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def row_seed(seed: int, key: str) -> int:
    """The sampling seed of the item with resume key `key`."""
    return _seed("vcd-sample", seed, key)


def noise_seed(seed: int, pixels: torch.Tensor) -> int:
    """The distortion seed of an image: from eval.vcd.seed and its preprocessed pixels."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return _seed("vcd-noise", seed, hashlib.sha256(data).hexdigest())


class ImagePairs:
    """generate_all's `load_image` under VCD: path -> (2, ...) tensor, the image and its distorted copy v′, as
    preprocessed pixels or, with a feature cache, as encoder outputs (None for an unreadable image)."""

    def __init__(self, model, load_pixels: Callable[[str], torch.Tensor | None], decoding: ContrastiveDecoding,
                 feature_cache: Optional[str] = None, preprocessing: Optional[dict] = None):
        self.load_pixels = load_pixels
        self.decoding = decoding
        self.sources: list[CachedFeatureSource] = []
        if feature_cache is not None:
            namespace = encoder_namespace(model.encoder, dict(preprocessing or {}))
            distortion = {"kind": "vcd-diffusion-noise", "noise_step": decoding.noise_step, "seed": decoding.seed,
                          "steps": NOISE_STEPS}
            self.sources = [CachedFeatureSource(model, FeatureCache(feature_cache, namespace), load_pixels),
                            CachedFeatureSource(model, FeatureCache(feature_cache, {**namespace, "distortion":
                                                                                    distortion}),
                                                self.distorted_pixels)]

    def distort(self, pixels: torch.Tensor) -> torch.Tensor:
        return distort_image(pixels, self.decoding.noise_step, noise_seed(self.decoding.seed, pixels))

    def distorted_pixels(self, path: str) -> torch.Tensor | None:
        pixels = self.load_pixels(path)
        return None if pixels is None else self.distort(pixels)

    def __call__(self, path: str) -> torch.Tensor | None:
        if self.sources:
            clean, distorted = (source(path) for source in self.sources)
        else:
            clean = self.load_pixels(path)
            distorted = None if clean is None else self.distort(clean)
        if clean is None or distorted is None:
            return None
        return torch.stack([clean, distorted])


def generate_vcd(model, prompts: list[str], pairs: torch.Tensor, decoding: ContrastiveDecoding, *,
                 item_keys: list[str], image_features: bool, max_new_tokens: int, num_beams: int = 1,
                 min_new_tokens: int = 0, stop_strings: list[str] | None = None) -> list[str]:
    """VCD answers to one batch: each prompt decoded from its (2, ...) pair of ImagePairs (the image and v′), as
    pixels or, with `image_features`, as encoder outputs; each row's draws are seeded by its item key."""
    if num_beams != 1:
        raise ValueError(f"VCD decodes one token per step; num_beams = {num_beams} cannot be honoured")
    if image_features:
        features = pairs.to(model.device)
    else:  # both streams' images through the encoder in one batch
        flat = model.encode_images(pairs.flatten(0, 1))
        features = flat.reshape(pairs.shape[0], 2, *flat.shape[1:])
    seeds = [row_seed(decoding.seed, key) for key in item_keys]
    return generate_contrastive(model, prompts, features[:, 0], features[:, 1], decoding, row_seeds=seeds,
                                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                stop_strings=stop_strings)
