"""Tiny model sizes and an offline-trained tokenizer: how tests, the tiny CPU recipe and the toy world build
real (small) models without downloading anything."""
from __future__ import annotations

import os
from typing import Iterable

# Same architecture classes as the real model, at a width a laptop trains in seconds.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=28, patch_size=14)
TINY_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    cross_attention_frequency=2, encoder_hidden_size=32)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512)
TINY_NUM_QUERY_TOKENS = 4

DEFAULT_CORPUS = [
    "a photo of a dog on the grass next to a red ball",
    "two cats sleeping on a sofa in the living room",
    "a man riding a bike down a busy street with cars and a bus",
    "a plate with a fork and a knife and a hot dog",
    "a woman holding an umbrella in the rain",
    "a kitchen with a stove a sink and a refrigerator",
    "an airplane flying in the blue sky over the city",
    "a giraffe and a zebra standing near a tree",
    "a red circle next to a small blue square and a green star",
    "describe this image. is there a person in the image? yes, there is. no, there is not.",
    "###Human: <Img></Img> ###Assistant: [INST] [/INST] USER: ASSISTANT:",
]


def train_tokenizer(out_dir: str, texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer offline (about a second) with LLaMA's special tokens <unk> <s> </s>.

    Like Vicuna's, it has no pad token; the model falls back to <unk> for padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_model_config(tokenizer_dir: str, projector: str = "vib", **overrides) -> dict:
    """A `model:` config section for a tiny random MiniGPT-4 (fp32, eager-free sdpa, 4 query tokens)."""
    cfg = dict(
        arch="minigpt4", tokenizer_path=tokenizer_dir, vision=dict(TINY_VISION), qformer=dict(TINY_QFORMER),
        llm=dict(TINY_LLM), num_query_tokens=TINY_NUM_QUERY_TOKENS, mm_projector_type=projector,
        llm_dtype="fp32", encoder_dtype="fp32", max_txt_len=64,
        vib=dict(num_samples=3, beta=1e-2, adaptive=True),
    )
    cfg.update(overrides)
    return cfg
