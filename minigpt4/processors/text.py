"""Caption cleaning for training targets (MiniGPT-4's `blip_caption` processor, as the training recipes use it).

`blip_caption` lower-cases, turns each of  . ! " ( ) * # : ; ~  into a space, collapses every whitespace run
(newlines and tabs included) into one space, strips both ends, keeps the first `max_words` space-separated
words, and prepends `prompt`.

Difference from LAVIS's caption processor, on purpose: LAVIS only collapses runs of two or more whitespace
characters, so a lone "\\n" or "\\t" inside a caption survives there and counts as part of a word; here all
whitespace becomes a single space. Captions without lone newlines/tabs come out identical.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from minigpt4.common.registry import Registry

TEXT_PROCESSORS: Registry[type] = Registry("text processor")

# Punctuation the reference removes from captions; replaced by a space so "red.The" still splits in two.
_REMOVED_CHARS = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUN = re.compile(r"\s+")


@TEXT_PROCESSORS.register("blip_caption")
class BlipCaptionProcessor:
    def __init__(self, prompt: str = "", max_words: int = 50):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {prompt!r}")
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words <= 0:
            raise ValueError(f"max_words: expected a positive integer, got {max_words!r}")
        self.prompt = prompt
        self.max_words = max_words

    def clean(self, caption: str) -> str:
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
        text = _REMOVED_CHARS.sub(" ", caption.lower())
        text = _WHITESPACE_RUN.sub(" ", text).strip()
        words = text.split(" ")
        if len(words) > self.max_words:
            text = " ".join(words[: self.max_words])
        return text

    def __call__(self, caption: str) -> str:
        return self.prompt + self.clean(caption)


def build_text_processor(cfg: Mapping[str, Any] | Any) -> BlipCaptionProcessor:
    """`{"name": "blip_caption", "max_words": 50, "prompt": ""}` -> processor instance."""
    return TEXT_PROCESSORS.build(cfg)
