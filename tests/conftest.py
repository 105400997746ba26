"""Shared fixtures: an offline tokenizer and tiny random MiniGPT-4 models. Nothing is downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread in every test process and, through OMP_NUM_THREADS, in the processes tests start (a test
# that needs another count sets it). The models are tiny, so a second thread gains nothing; on a busy machine
# (two pytest-xdist workers on 2 cores, or other jobs) two OpenMP threads per process waited for each other:
# one generation of tests/_hf_reload.py took 1.1-3.4 s with 2 threads and 0.07-0.18 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


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
