"""Prompt token ids exactly as the reference code produced them.

MiniGPT-4, AdaVIB and OPERA ran transformers 4.28/4.29 with the slow SentencePiece `LlamaTokenizer`
(jiaqi5598/AdaVIB minigpt4/models/mini_gpt4.py and shikiw/OPERA minigpt4/models/mini_gpt4.py:
`LlamaTokenizer.from_pretrained(llama_model, use_fast=False)`; haotian-liu/LLaVA loads the same slow class with
`AutoTokenizer.from_pretrained(model_path, use_fast=False)`). Every string those programs tokenized on its own went
through `sp_model.encode`:
  * SentencePiece puts its dummy prefix "▁" in front of the string, also when the string already starts with a
    space (" Please" -> "▁", "▁Please");
  * "<s>", "</s>" and "<unk>" written in the text became their ids (the slow tokenizer split them out first);
  * BOS came only where the code asked for it (`add_special_tokens=True`, or a BOS embedding prepended).

transformers 5 no longer has that class. Its Llama tokenizer is a `tokenizers` BPE whose Metaspace pre-tokenizer
adds no "▁" to a string that starts with a space, so " Please describe …" (OPERA's LLaVA-1.5 text after the
image) comes out one token shorter than the source fed the model. `SegmentTokenizer` therefore encodes with the
folder's own SentencePiece model (`tokenizer.model`, which Vicuna and LLaVA folders ship) through the
`sentencepiece` library, after checking that it numbers its pieces exactly as the loaded tokenizer does (decoding
and stop strings still use the transformers tokenizer). A tokenizer without a SentencePiece model (a plain
`tokenizers` BPE such as the tiny test tokenizers) has no other ids than its own: it is used as it is.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

from minigpt4.common.config import ConfigError
from minigpt4.conversation.templates import IMAGE_PLACEHOLDER, SEGMENT_BREAK


def sentencepiece_model_path(tokenizer) -> str | None:
    """The `tokenizer.model` the transformers tokenizer was loaded from, if its folder has one."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    folder = getattr(tokenizer, "name_or_path", None)
    if folder:
        candidates.append(os.path.join(folder, "tokenizer.model"))
    for path in candidates:
        if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path):
            return path
    return None


def load_sentencepiece(path: str, tokenizer):
    """The SentencePiece model at `path`, checked piece by piece against the transformers tokenizer (a folder
    whose tokenizer.json and tokenizer.model disagree would otherwise feed ids the decoder reads differently)."""
    import sentencepiece

    try:
        model = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"{path}: not a readable SentencePiece model ({err})") from None
    size = model.get_piece_size()
    if size > len(tokenizer):
        raise ConfigError(f"{path} has {size} pieces but the tokenizer loaded beside it has {len(tokenizer)} tokens")
    ours = tokenizer.convert_ids_to_tokens(list(range(size)))
    for index, piece in enumerate(model.id_to_piece(list(range(size)))):
        if ours[index] != piece:
            raise ConfigError(f"{path}: token {index} is {piece!r} there but {ours[index]!r} in the tokenizer loaded "
                              "from the same folder; the folder's tokenizer files do not belong together")
    return model


class SegmentTokenizer:
    """Token ids of separately tokenized prompt segments, as the sources' slow LlamaTokenizer gave them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        path = sentencepiece_model_path(tokenizer)
        self.sentencepiece = load_sentencepiece(path, tokenizer) if path is not None else None
        self.special_ids: dict[str, int] = {}
        if self.sentencepiece is not None:  # the slow class's special tokens: the model's control/unknown pieces
            sp = self.sentencepiece
            self.special_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                                if sp.is_control(i) or sp.is_unknown(i)}
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @property
    def uses_sentencepiece(self) -> bool:
        return self.sentencepiece is not None

    def encode(self, text: str) -> list[int]:
        """One separately tokenized string, no BOS: `tokenizer(text, add_special_tokens=False).input_ids` of the
        slow LlamaTokenizer."""
        if not text:
            return []
        if self.sentencepiece is None:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        ids: list[int] = []
        pieces = self._special_split.split(text) if self._special_split is not None else [text]
        for piece in pieces:
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self.sentencepiece.encode(piece))
        return ids

    def encode_segments(self, segments: Iterable[str], *, bos: bool) -> list[int]:
        """Segments tokenized one by one and concatenated, with BOS in front when `bos`."""
        ids = [self.tokenizer.bos_token_id] if bos else []
        for segment in segments:
            ids.extend(self.encode(segment))
        return ids

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """(ids before the image, ids after it) of a prompt with one <ImageHere>: each side's segments (split at
        SEGMENT_BREAK) tokenized one by one, BOS in front of the first."""
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt must contain {IMAGE_PLACEHOLDER} exactly once: {prompt!r}")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        return (self.encode_segments(before.split(SEGMENT_BREAK), bos=True),
                self.encode_segments(after.split(SEGMENT_BREAK), bos=False))
