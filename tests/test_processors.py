"""Image transforms (crop statistics, determinism, resize, normalisation) and caption cleaning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from minigpt4.processors import (
    CLIP_MEAN,
    CLIP_STD,
    Blip2ImageTrainProcessor,
    build_image_processor,
    build_text_processor,
)


def _two_colour_image(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels, "RGB")


def _expected_normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255.0 - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


# ---------------------------------------------------------------- RandomResizedCrop


def test_crop_boxes_fit_and_respect_scale_and_ratio():
    processor = Blip2ImageTrainProcessor(image_size=32, seed=0)
    width, height = 400, 300
    fractions, ratios = [], []
    for _ in range(500):
        box = processor.sample_crop_box(width, height)
        assert box.left >= 0 and box.top >= 0
        assert box.left + box.width <= width and box.top + box.height <= height
        fractions.append(box.width * box.height / (width * height))
        ratios.append(box.width / box.height)
    # rounding of w and h to integers moves the area/ratio by well under 2 %
    assert min(fractions) >= 0.5 - 0.02 and max(fractions) <= 1.0 + 1e-9
    assert min(ratios) >= 3 / 4 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    # the draws actually cover the range, not one corner of it
    assert min(fractions) < 0.55 and max(fractions) > 0.9
    assert min(ratios) < 0.85 and max(ratios) > 1.2
    lefts = {processor.sample_crop_box(width, height).left for _ in range(50)}
    assert len(lefts) > 10


def test_crop_falls_back_to_centre_crop_for_elongated_images():
    processor = Blip2ImageTrainProcessor(image_size=8, seed=0)
    # 1000x10: every try needs a height of at least sqrt(5000 / (4/3)) ~ 61 > 10, so all 10 tries fail
    box = processor.sample_crop_box(1000, 10)
    assert (box.width, box.height) == (13, 10)  # round(10 * 4/3) wide, the full height
    assert box.left == (1000 - 13) // 2 and box.top == 0
    tall = processor.sample_crop_box(10, 1000)
    assert (tall.width, tall.height) == (10, 13) and tall.top == (1000 - 13) // 2


def test_train_output_shape_and_crop_uses_the_box():
    processor = Blip2ImageTrainProcessor(image_size=24, seed=3)
    image = _two_colour_image(60, 40)
    out = processor(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    # a uniform image stays uniform under any crop + bicubic resize: exact normalisation numbers
    uniform = processor(Image.new("RGB", (50, 70), (200, 100, 50)))
    expected = _expected_normalised((200, 100, 50))
    assert torch.allclose(uniform, expected.view(3, 1, 1).expand(3, 24, 24), atol=1e-5)


def test_fixed_seed_is_deterministic_and_seeds_differ():
    image = _two_colour_image(80, 60)
    a = Blip2ImageTrainProcessor(image_size=16, seed=7)
    b = Blip2ImageTrainProcessor(image_size=16, seed=7)
    c = Blip2ImageTrainProcessor(image_size=16, seed=8)
    boxes_a = [a.sample_crop_box(80, 60) for _ in range(20)]
    boxes_b = [b.sample_crop_box(80, 60) for _ in range(20)]
    boxes_c = [c.sample_crop_box(80, 60) for _ in range(20)]
    assert boxes_a == boxes_b and boxes_a != boxes_c
    assert torch.equal(Blip2ImageTrainProcessor(16, seed=1)(image), Blip2ImageTrainProcessor(16, seed=1)(image))


def test_default_seed_follows_torch_global_rng():
    processor = Blip2ImageTrainProcessor(image_size=16)
    torch.manual_seed(123)
    first = [processor.sample_crop_box(90, 70) for _ in range(10)]
    torch.manual_seed(123)
    second = [processor.sample_crop_box(90, 70) for _ in range(10)]
    torch.manual_seed(124)
    third = [processor.sample_crop_box(90, 70) for _ in range(10)]
    assert first == second and first != third


class _CropBoxes(Dataset):
    def __init__(self, processor: Blip2ImageTrainProcessor):
        self.processor = processor

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, int, int, int]:
        return tuple(self.processor.sample_crop_box(300, 200))


@pytest.mark.parametrize("seed", [None, 5])
def test_dataloader_workers_draw_different_but_reproducible_crops(seed):
    def run() -> list[tuple[int, ...]]:
        torch.manual_seed(0)
        loader = DataLoader(_CropBoxes(Blip2ImageTrainProcessor(16, seed=seed)), batch_size=1, num_workers=2,
                            multiprocessing_context="fork")
        return [tuple(int(v) for v in batch) for batch in loader]

    boxes = run()
    # samples 0 and 1 are each the first draw of a different worker: they must not coincide
    assert boxes[0] != boxes[1]
    assert run() == boxes


# ---------------------------------------------------------------- eval resize


def test_eval_is_plain_resize_without_crop_or_padding():
    processor = build_image_processor({"name": "blip2_image_eval", "image_size": 16})
    image = _two_colour_image(64, 20)  # very wide: an aspect-preserving resize would pad or crop
    out = processor(image)
    assert out.shape == (3, 16, 16)
    red, blue = _expected_normalised((255, 0, 0)), _expected_normalised((0, 0, 255))
    # columns well inside each half keep their colour over the whole height
    assert torch.allclose(out[:, :, :6], red.view(3, 1, 1).expand(3, 16, 6), atol=0.05)
    assert torch.allclose(out[:, :, 10:], blue.view(3, 1, 1).expand(3, 16, 6), atol=0.05)
    reference = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(reference).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_normalisation_numbers_match_clip():
    processor = build_image_processor({"name": "blip2_image_eval", "image_size": 4})
    black = processor(Image.new("RGB", (4, 4), (0, 0, 0)))
    white = processor(Image.new("RGB", (4, 4), (255, 255, 255)))
    assert torch.allclose(black[:, 0, 0], torch.tensor([-1.7922625, -1.7520971, -1.4802198]), rtol=0, atol=1e-6)
    assert torch.allclose(white[:, 0, 0], torch.tensor([1.9303363, 2.0748838, 2.1458970]), rtol=0, atol=1e-6)


def test_processors_reject_non_rgb_and_bad_configs():
    processor = build_image_processor({"name": "blip2_image_eval", "image_size": 8})
    with pytest.raises(ValueError, match="load_rgb"):
        processor(Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match=r"^name: unknown image processor 'nope'"):
        build_image_processor({"name": "nope"})
    with pytest.raises(ValueError, match=r"^name: required"):
        build_image_processor({"image_size": 224})
    with pytest.raises(ValueError, match=r"^crop: unknown option"):
        build_image_processor({"name": "blip2_image_train", "crop": 1})
    with pytest.raises(ValueError, match=r"^image_size: expected a positive integer"):
        build_image_processor({"name": "blip2_image_eval", "image_size": "224"})
    with pytest.raises(ValueError, match=r"^min_scale/max_scale"):
        build_image_processor({"name": "blip2_image_train", "min_scale": 0.9, "max_scale": 0.5})
    with pytest.raises(ValueError, match=r"^max_words"):
        build_text_processor({"name": "blip_caption", "max_words": 0})


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("A man, riding a HORSE!", "a man, riding a horse"),
        ("Hello.World", "hello world"),
        ('"Quoted" (paren) *star* #hash: semi; tilde~end', "quoted paren star hash semi tilde end"),
        ("  many   spaces\n\nand lines \t tab \n", "many spaces and lines tab"),
        ("Don't stop...", "don't stop"),
        ("...!!!", ""),
    ],
)
def test_caption_cleaning(raw, cleaned):
    assert build_text_processor({"name": "blip_caption"})(raw) == cleaned


def test_caption_is_cut_to_max_words_after_cleaning():
    processor = build_text_processor({"name": "blip_caption"})
    words = [f"w{i}" for i in range(60)]
    assert processor(" ".join(words)) == " ".join(words[:50])
    assert processor(" ".join(words[:50])) == " ".join(words[:50])
    # removed punctuation does not count as words: 50 real words separated by " . " stay complete
    assert processor(" . ".join(words[:50])) == " ".join(words[:50])
    short = build_text_processor({"name": "blip_caption", "max_words": 3})
    assert short("One two, three. Four five") == "one two, three"


def test_caption_prompt_prefix_and_type_check():
    processor = build_text_processor({"name": "blip_caption", "prompt": "a picture of "})
    assert processor("A Dog.") == "a picture of a dog"
    with pytest.raises(TypeError, match="caption must be a string"):
        processor(42)
    assert len(processor("x " * 100).split()) == 3 + 50
