"""Shared fixtures: an offline tokenizer and tiny random MiniGPT-4 models. Nothing is downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from minigpt4.common.tiny_models import train_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    train_tokenizer(path)
    return path


@pytest.fixture
def tiny_model_factory(tiny_tokenizer_dir):
    """tiny_model_factory(projector="vib", seed=0, **overrides) -> MiniGPT4 in fp32 on CPU."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    def make(projector: str = "vib", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_model_config(tiny_tokenizer_dir, projector, **overrides))

    return make
