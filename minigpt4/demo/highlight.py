"""Mark the object words of an answer, exactly as CHAIR would count them, as HTML spans.

CHAIR (minigpt4.eval.chair) lower-cases, tokenizes with NLTK, singularizes and merges two-word names before it
looks words up; those steps lose the character positions. This module repeats the same steps on tokens that
keep their position in the original text, so a highlighted word is precisely a word the CHAIR scorer counts
(tests check the two agree). A merged pair ("hot dog") is highlighted as one span.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import nltk

from minigpt4.eval.chair import MERGE_TABLE, CHAIRScorer, singularize

# Inline styles as well as classes: the chat widget may drop an unknown class's stylesheet, not the style.
_STYLE_SHARED = "background:#fde68a;color:#111;border-radius:3px;padding:0 2px"
_STYLE_ONLY_HERE = "background:#fca5a5;color:#111;border-radius:3px;padding:0 2px;font-weight:600"


@dataclass(frozen=True)
class ObjectMention:
    word: str  # the matched CHAIR vocabulary entry ("bike")
    canonical: str  # its COCO category name ("bicycle")
    start: int | None  # character span in the original text; None if the tokenizer rewrote the token
    end: int | None


def _lowered_with_offsets(text: str) -> tuple[str, list[int]]:
    """text.lower() and, for each of its characters, the index of the original character it came from
    (a few characters lower-case to two, e.g. 'İ', so positions can shift)."""
    chars, origin = [], []
    for i, ch in enumerate(text):
        low = ch.lower()
        chars.append(low)
        origin.extend([i] * len(low))
    return "".join(chars), origin


def object_mentions(scorer: CHAIRScorer, text: str) -> list[ObjectMention]:
    """CHAIR's mentions of `text` (same words, same order as scorer.caption_to_objects) with positions."""
    lowered, origin = _lowered_with_offsets(text)
    tokens = nltk.word_tokenize(lowered)
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for token in tokens:
        found = lowered.find(token, cursor)
        if found < 0:  # Treebank rewrites some tokens (" -> `` or ''); such tokens are never object words
            spans.append(None)
            continue
        spans.append((found, found + len(token)))
        cursor = found + len(token)
    words = [singularize(t) for t in tokens]

    merged: list[tuple[str, tuple[int, int] | None]] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in MERGE_TABLE:
            a, b = spans[i], spans[i + 1]
            merged.append((MERGE_TABLE[pair], (a[0], b[1]) if a and b else None))
            i += 2
        else:
            merged.append((words[i], spans[i]))
            i += 1
    if any(w == "toilet" for w, _ in merged) and any(w == "seat" for w, _ in merged):
        merged = [(w, s) for w, s in merged if w != "seat"]  # CHAIR's toilet-seat rule

    mentions = []
    for word, span in merged:
        if word not in scorer.vocabulary:
            continue
        if span is None:
            mentions.append(ObjectMention(word, scorer.canonical[word], None, None))
        else:
            start = origin[span[0]]
            end = origin[span[1] - 1] + 1
            mentions.append(ObjectMention(word, scorer.canonical[word], start, end))
    return mentions


def highlight_html(text: str, mentions: list[ObjectMention], only_here: set[str] | None = None) -> str:
    """`text` HTML-escaped, with each located mention wrapped in <mark>. Mentions whose canonical name is in
    `only_here` (objects the other answer does not mention) get a stronger colour and class `chair-only`."""
    only_here = only_here or set()
    out, cursor = [], 0
    for m in sorted((m for m in mentions if m.start is not None), key=lambda m: m.start):
        if m.start < cursor:  # overlapping spans cannot happen with sequential tokens; be safe anyway
            continue
        out.append(html.escape(text[cursor:m.start]))
        exclusive = m.canonical in only_here
        cls = "chair-obj chair-only" if exclusive else "chair-obj"
        style = _STYLE_ONLY_HERE if exclusive else _STYLE_SHARED
        out.append(f'<mark class="{cls}" style="{style}" title="{html.escape(m.canonical)}">'
                   f"{html.escape(text[m.start:m.end])}</mark>")
        cursor = m.end
    out.append(html.escape(text[cursor:]))
    return "".join(out)


def highlight_pair(scorer: CHAIRScorer, first: str, second: str) -> tuple[str, str]:
    """Both answers of compare mode highlighted; objects named by only one answer stand out in it."""
    a, b = object_mentions(scorer, first), object_mentions(scorer, second)
    names_a, names_b = {m.canonical for m in a}, {m.canonical for m in b}
    return highlight_html(first, a, names_a - names_b), highlight_html(second, b, names_b - names_a)
