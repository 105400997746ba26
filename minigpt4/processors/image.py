"""Image transforms for training and evaluation, written on PIL + numpy (no torchvision).

Both processors take an 8-bit RGB `PIL.Image` (see `minigpt4.common.images.load_rgb`, which turns any
readable file into one) and return a float tensor [3, S, S] normalised with CLIP's mean/std, which is what
the EVA ViT-g (and CLIP ViT-L for LLaVA) were trained on.

Randomness and determinism (`blip2_image_train`):
  * `seed=None` (the default, use it for training): every draw comes from torch's global RNG. The main
    process is controlled by `torch.manual_seed`, and a DataLoader seeds each worker's torch RNG with
    `base_seed + worker_id`, where `base_seed` is drawn from the main process's torch RNG every time the
    workers start. So `torch.manual_seed(s)` before building the DataLoader makes every crop of every epoch
    reproducible, workers differ from each other, and epochs differ from each other.
  * `seed=<int>`: a private `torch.Generator`. In the main process it is seeded with `seed` exactly (handy in
    tests and for single-process debugging). Inside a DataLoader worker it is re-seeded from `seed` and that
    worker's `torch.initial_seed()` (see `process_seed`), so workers never repeat each other's crops
    (a generator copied unchanged into every worker would give all workers the same crop sequence).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from PIL import Image

from minigpt4.common.registry import Registry

IMAGE_PROCESSORS: Registry[type] = Registry("image processor")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def process_seed(seed: int) -> int:
    """The seed a private RNG should use in the current process.

    In the main process this is `seed` itself. In a DataLoader worker it mixes in `torch.initial_seed()`,
    which the DataLoader sets to `base_seed + worker_id` (base_seed is drawn from the main process's torch
    RNG each time workers start), so each worker -- and each epoch with non-persistent workers -- gets its
    own stream while the whole run stays reproducible under `torch.manual_seed`.
    """
    if torch.utils.data.get_worker_info() is None:
        return seed
    return (seed * 1_000_003 + torch.initial_seed()) % (2**63)


class CropBox(NamedTuple):
    left: int
    top: int
    width: int
    height: int


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _triple(key: str, value: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise ValueError(f"{key}: expected three numbers (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]


class _NormalizeToTensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1] -> (x - mean) / std."""

    def __init__(self, mean: Any = CLIP_MEAN, std: Any = CLIP_STD):
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every entry must be > 0, got {self.std}")
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(
                f"expected an RGB image, got mode {image.mode!r}; load images with "
                "minigpt4.common.images.load_rgb, which converts every mode to RGB"
            )
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # H, W, 3
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return (tensor - self._mean) / self._std


@IMAGE_PROCESSORS.register("blip2_image_train")
class Blip2ImageTrainProcessor(_NormalizeToTensor):
    """RandomResizedCrop(image_size, scale=(min_scale, max_scale), ratio=(3/4, 4/3), bicubic) + CLIP norm.

    The crop box is drawn the way torchvision's RandomResizedCrop draws it: up to 10 tries of a target area
    (uniform fraction of the image area) and a log-uniform aspect ratio, accepting the first box that fits
    inside the image at a uniform position; if none fits, a centred crop clamped to the allowed ratio range.
    """

    attempts = 10

    def __init__(
        self,
        image_size: int = 224,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        ratio: Any = (3 / 4, 4 / 3),
        mean: Any = CLIP_MEAN,
        std: Any = CLIP_STD,
        seed: int | None = None,
    ):
        super().__init__(mean, std)
        self.image_size = _positive_int("image_size", image_size)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError("min_scale/max_scale: expected 0 < min_scale <= max_scale <= 1, "
                             f"got {min_scale}, {max_scale}")
        try:
            self.ratio = (float(ratio[0]), float(ratio[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"ratio: expected two numbers (min, max aspect ratio w/h), got {ratio!r}") from None
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio: expected 0 < min <= max, got {ratio!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected an integer or null, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_pid = -1

    def _rng(self) -> torch.Generator | None:
        """None means torch's global RNG; otherwise a private generator, (re)seeded once per process."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator_pid != os.getpid():
            self._generator = torch.Generator().manual_seed(process_seed(self.seed))
            self._generator_pid = os.getpid()
        return self._generator

    def _uniform(self, low: float, high: float, rng: torch.Generator | None) -> float:
        return low + (high - low) * torch.rand((), generator=rng).item()

    def _randint(self, low: int, high: int, rng: torch.Generator | None) -> int:
        """Uniform integer in [low, high], both ends included."""
        return int(torch.randint(low, high + 1, (), generator=rng).item())

    def sample_crop_box(self, width: int, height: int) -> CropBox:
        rng = self._rng()
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.attempts):
            target_area = area * self._uniform(self.min_scale, self.max_scale, rng)
            aspect = math.exp(self._uniform(log_low, log_high, rng))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = self._randint(0, height - crop_h, rng)
                left = self._randint(0, width - crop_w, rng)
                return CropBox(left, top, crop_w, crop_h)
        # Fallback (very elongated images): the largest centred box whose ratio lies in the allowed range.
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif image_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return CropBox((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = self.sample_crop_box(*image.size)
        # resize(box=...) crops and resamples in one step, with PIL's antialiased bicubic filter.
        crop = image.resize(
            (self.image_size, self.image_size),
            Image.Resampling.BICUBIC,
            box=(box.left, box.top, box.left + box.width, box.top + box.height),
        )
        return self.to_tensor(crop)


@IMAGE_PROCESSORS.register("blip2_image_eval")
class Blip2ImageEvalProcessor(_NormalizeToTensor):
    """Bicubic resize to image_size x image_size (aspect ratio NOT preserved) + CLIP normalisation."""

    def __init__(self, image_size: int = 224, mean: Any = CLIP_MEAN, std: Any = CLIP_STD):
        super().__init__(mean, std)
        self.image_size = _positive_int("image_size", image_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return self.to_tensor(resized)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's "pad" aspect mode: centre the image on a square canvas of its longer side, filled with
    `fill` (the normalisation mean as 8-bit colour, so the padding becomes ~0 after normalising)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _mean_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    # LLaVA truncates (int(), not round()): CLIP's mean gives (122, 116, 104).
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


@IMAGE_PROCESSORS.register("clip_image_eval")
class ClipImageEvalProcessor(Blip2ImageEvalProcessor):
    """LLaVA-1.5 evaluation transform: pad to square with the mean colour, bicubic resize to 336, CLIP norm.

    Equals LLaVA's expand2square + CLIPImageProcessor (resize shortest edge, centre crop: a no-op on a square).
    """

    def __init__(self, image_size: int = 336, mean: Any = CLIP_MEAN, std: Any = CLIP_STD, pad: bool = True):
        super().__init__(image_size, mean, std)
        self.pad = bool(pad)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return super().__call__(pad_to_square(image, _mean_colour(self.mean)) if self.pad else image)


@IMAGE_PROCESSORS.register("clip_image_train")
class ClipImageTrainProcessor(Blip2ImageTrainProcessor):
    """Pad to square with the mean colour (as LLaVA-1.5 sees every image), then the same RandomResizedCrop +
    CLIP norm as `blip2_image_train`, at 336 px by default."""

    def __init__(
        self,
        image_size: int = 336,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        ratio: Any = (3 / 4, 4 / 3),
        mean: Any = CLIP_MEAN,
        std: Any = CLIP_STD,
        seed: int | None = None,
        pad: bool = True,
    ):
        super().__init__(image_size, min_scale, max_scale, ratio, mean, std, seed)
        self.pad = bool(pad)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return super().__call__(pad_to_square(image, _mean_colour(self.mean)) if self.pad else image)


def build_image_processor(cfg: Mapping[str, Any] | Any) -> Blip2ImageTrainProcessor | Blip2ImageEvalProcessor:
    """`{"name": "blip2_image_train", "image_size": 224, ...}` -> processor instance."""
    return IMAGE_PROCESSORS.build(cfg)
