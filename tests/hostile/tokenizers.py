"""Hostile tokenizers: no pad or BOS token, a folder without a tokenizer, malformed tokenizer files."""
from __future__ import annotations

import json
import logging
from functools import partial

from _hostile import TINY_RECIPE, Case, Env, Exits2, Holds, Raises, WarningRecords

from minigpt4.common.config import ConfigError


def tokenizer_without_pad(env: Env) -> bool:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    records = WarningRecords()
    logger = logging.getLogger("minigpt4.models.minigpt4")
    logger.addHandler(records)
    try:
        model = build_model(tiny_model_config(env.shared.tokenizer_dir, "linear"))
    finally:
        logger.removeHandler(records)
    assert [m for m in records.messages if "pad" in m] == ["tokenizer has no pad token; using '<unk>' for padding "
                                                            "(masked out everywhere)"]
    tok = model.tokenizer
    assert tok.pad_token_id == tok.unk_token_id
    train_text = model.build_training_text([None, None], ["a red circle next to a small blue square", "a dog"])
    padded = train_text.attention_mask == 0
    assert padded[1].any() and not padded[0].any()  # right padding on the short row only
    assert (train_text.input_ids[padded] == tok.unk_token_id).all() and (train_text.labels[padded] == -100).all()
    gen_text = model.build_generation_text(["a <ImageHere> b", "a long prompt here <ImageHere> and more words"])
    padded = gen_text.attention_mask == 0
    assert padded[0, 0] and not padded[1].any()  # left padding for generation, masked
    return True


def tokenizer_without_bos(env: Env) -> None:
    from transformers import AutoTokenizer

    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    tokenizer = AutoTokenizer.from_pretrained(env.shared.tokenizer_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(env.tmp / "tokenizer-no-bos")
    build_model(tiny_model_config(str(env.tmp / "tokenizer-no-bos"), "linear"))


def not_a_tokenizer(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    (env.tmp / "vicuna-7b").mkdir()
    (env.tmp / "vicuna-7b" / "README.md").write_text("weights go here\n")
    build_model(tiny_model_config(str(env.tmp / "vicuna-7b"), "linear"))


def _tokenizer_with(files: dict[str, str], env: Env) -> str:
    """A copy of the tiny tokenizer folder with `files` (name: text) written over it."""
    import shutil

    folder = env.tmp / "tokenizer"
    shutil.copytree(env.shared.tokenizer_dir, folder)
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def tokenizer_files(files: dict[str, str], env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    build_model(tiny_model_config(_tokenizer_with(files, env), "linear"))


def train_with_tokenizer(files: dict[str, str], env: Env) -> tuple[int, str]:
    """train.py on the tiny recipe with a damaged tokenizer: found when the model is built, so "error: ..."."""
    import train

    options = env.shared.tiny_data_options() + [f"model.tokenizer_path={_tokenizer_with(files, env)}",
                                                f"run.output_dir={env.tmp / 'out'}"]
    return train.main(["--cfg-path", TINY_RECIPE, "--options", *options]), ""


NOT_A_TOKENIZER = {"tokenizer.json": json.dumps({"version": "1.0", "vocab": {"a": 0, "b": 1}})}

TOKENIZER_CASES = [
    Case("tokenizer/no-pad-token", tokenizer_without_pad, Holds("pads with <unk>, one warning, padding masked")),
    Case("tokenizer/no-bos-token", tokenizer_without_bos,
         Raises(ValueError, ("{tmp}/tokenizer-no-bos", "has no BOS token", "model.tokenizer_path"))),
    Case("tokenizer/folder-without-tokenizer", not_a_tokenizer,
         Raises(ConfigError, ("cannot load a tokenizer from {tmp}/vicuna-7b",))),
    # valid JSON, but not what transformers reads (it would fail with a bare KeyError / AttributeError)
    Case("tokenizer/tokenizer-json-not-a-tokenizer", partial(tokenizer_files, NOT_A_TOKENIZER),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json is not a Hugging Face tokenizer file (no 'model' "
                              "entry)",))),
    Case("tokenizer/tokenizer-json-a-list", partial(tokenizer_files, {"tokenizer.json": "[1, 2]"}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json: expected a JSON object, got list",))),
    Case("tokenizer/tokenizer-json-model-incomplete",
         partial(tokenizer_files, {"tokenizer.json": '{"model": {"type": "BPE"}}'}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer.json is not a Hugging Face tokenizer file (",))),
    Case("tokenizer/tokenizer-config-a-list", partial(tokenizer_files, {"tokenizer_config.json": "[]"}),
         Raises(ConfigError, ("{tmp}/tokenizer/tokenizer_config.json: expected a JSON object, got list",))),
    Case("tokenizer/tokenizer-json-not-a-tokenizer/train-cli", partial(train_with_tokenizer, NOT_A_TOKENIZER),
         Exits2(("tokenizer.json is not a Hugging Face tokenizer file",), prefix="error: ")),
]
