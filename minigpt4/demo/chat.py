"""The demo's logic without Gradio: load an image, chat about it, stream the answers, compare two projectors.

Everything a browser can trigger goes through `DemoEngine.upload` and `DemoEngine.answer`, which take and
return plain Python values (a `ChatState`, strings, chat messages), so tests drive them directly with a tiny
model. Bad input raises `DemoInputError`, whose message is written for the person at the page; app.py shows
it as a warning and a status line, never as a stack trace.
"""
from __future__ import annotations

import html
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from minigpt4.common.images import BadImageError, load_rgb
from minigpt4.conversation.templates import Conversation
from minigpt4.demo.diagnostics import diagnostics_markdown
from minigpt4.demo.highlight import highlight_html, highlight_pair, object_mentions
from minigpt4.models.visual_diagnostics import ImageDiagnostics, diagnose_features

log = logging.getLogger(__name__)

DEMO_MAX_PIXELS = 40_000_000  # refuse larger uploads from the header, before decoding (decompression bombs)
MAX_QUESTION_CHARS = 2000
PREVIEW_SIZE = 512
PREVIEW_MIN = 320  # smaller images are enlarged (whole pixels, nearest neighbour) to at least this long side
BASE, COMPARE = "base", "compare"
TITLES = {BASE: "Base projector", COMPARE: "Compare projector"}


def preview_image(image: Image.Image) -> Image.Image:
    """The image as the page shows it: at most PREVIEW_SIZE on the long side; a small image (the 64-px shapes
    world, a thumbnail) enlarged by a whole factor with nearest-neighbour, so its pixels stay sharp and readable."""
    preview = image.copy()
    long_side = max(preview.size)
    if long_side < PREVIEW_MIN:
        factor = -(-PREVIEW_MIN // long_side)  # ceil: at least PREVIEW_MIN
        factor = min(factor, PREVIEW_SIZE // long_side) or 1
        return preview.resize((preview.width * factor, preview.height * factor), Image.Resampling.NEAREST)
    preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return preview


class DemoInputError(ValueError):
    """Something the user can fix (wrong file, empty question, ...); the message says what to do."""


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9

    def checked(self) -> "DecodingSettings":
        if not 1 <= int(self.max_new_tokens) <= 2048:
            raise DemoInputError(f"max new tokens must be between 1 and 2048, got {self.max_new_tokens}")
        if not 1 <= int(self.num_beams) <= 10:
            raise DemoInputError(f"beams must be between 1 and 10, got {self.num_beams}")
        if self.do_sample and not 0 < float(self.temperature) <= 5:
            raise DemoInputError(f"temperature must be in (0, 5] when sampling, got {self.temperature}")
        if self.do_sample and not 0 < float(self.top_p) <= 1:
            raise DemoInputError(f"top-p must be in (0, 1] when sampling, got {self.top_p}")
        return DecodingSettings(int(self.max_new_tokens), int(self.num_beams), bool(self.do_sample),
                                float(self.temperature), float(self.top_p))


@dataclass
class ChatState:
    """One browser session: the current image (encoded once) and a conversation per projector."""

    image_name: str | None = None
    features: torch.Tensor | None = None  # (1, N, D) Q-Former outputs of the current image
    conversations: dict[str, Conversation] = field(default_factory=dict)
    diagnostics: dict[str, ImageDiagnostics] = field(default_factory=dict)


@dataclass
class ChatUpdate:
    state: ChatState
    messages: dict[str, list[dict]]  # chat history per projector, in Gradio's messages format
    status: str


class DemoEngine:
    """Holds the model (and the compare model, which shares its frozen backbone) and the image transform.

    `scorer_factory` builds the CHAIR scorer on first use: NLTK's tables load only when needed.
    """

    def __init__(self, model, image_processor: Callable[[Image.Image], torch.Tensor], *,
                 compare_model=None, scorer_factory: Callable[[], object] | None = None,
                 max_pixels: int = DEMO_MAX_PIXELS, top_k: int = 10):
        self.models = {BASE: model.eval()}
        if compare_model is not None:
            self.models[COMPARE] = compare_model.eval()
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.top_k = top_k
        self._scorer_factory = scorer_factory
        self._scorer = None

    @property
    def has_compare(self) -> bool:
        return COMPARE in self.models

    @property
    def scorer(self):
        if self._scorer is None and self._scorer_factory is not None:
            self._scorer = self._scorer_factory()
        return self._scorer

    def new_state(self) -> ChatState:
        return ChatState()

    # ------------------------------------------------------------------------------------ images
    def upload(self, state: ChatState, path: str | os.PathLike | None) -> tuple[ChatState, Image.Image, str]:
        """A new image starts a new conversation. Returns (state, preview image, diagnostics Markdown)."""
        if path is None:
            raise DemoInputError("No file received. Choose an image file (JPEG, PNG, WebP, ...).")
        name = os.path.basename(str(path))
        try:
            image = load_rgb(path, max_pixels=self.max_pixels, name=name)
        except BadImageError as err:
            raise DemoInputError(f"Cannot use {name}: {err.reason}. Please upload a different image.") from None
        with torch.no_grad():
            features = self.models[BASE].encode_images(self.image_processor(image).unsqueeze(0))
        state = ChatState(image_name=name, features=features,
                          conversations={k: Conversation(m.template) for k, m in self.models.items()})
        for key, model in self.models.items():
            state.diagnostics[key] = diagnose_features(model, features, top_k=self.top_k)[0]
        return state, preview_image(image), self.diagnostics_markdown(state)

    def diagnostics_markdown(self, state: ChatState) -> str:
        return "\n\n".join(diagnostics_markdown(d, f"{TITLES[k]} — {state.image_name}")
                           for k, d in state.diagnostics.items())

    def similarity_figure(self, state: ChatState):
        """The top-k similarity bar plot of the current image, one panel per projector (None before an image)."""
        if not state.diagnostics:
            return None
        from minigpt4.demo.plots import similarity_figure

        return similarity_figure({TITLES[k]: d for k, d in state.diagnostics.items()})

    # ------------------------------------------------------------------------------------ chat
    def answer(self, state: ChatState, question: str, settings: DecodingSettings,
               compare: bool = False) -> Iterator[ChatUpdate]:
        """Ask `question` about the current image; yields updates as tokens arrive (one per piece of text),
        first from the base projector, then, in compare mode, from the compare projector."""
        question = (question or "").strip()
        if state.features is None:
            raise DemoInputError("Upload an image first, then ask about it.")
        if not question:
            raise DemoInputError("Type a question about the image.")
        if len(question) > MAX_QUESTION_CHARS:
            raise DemoInputError(f"The question is {len(question)} characters long; "
                                 f"keep it under {MAX_QUESTION_CHARS}.")
        settings = settings.checked()
        if compare and not self.has_compare:
            raise DemoInputError("Compare mode needs a second projector: start the demo with --compare-ckpt PATH.")
        keys = [BASE, COMPARE] if compare else [BASE]
        for key in keys:
            self._check_length(key, state, question, settings)
        for key in keys:
            state.conversations[key].ask(question)
        try:
            for key in keys:
                partial = ""
                for partial in self._generate(key, state, settings):
                    yield ChatUpdate(state, self.messages(state, pending={key: partial}),
                                     f"The {key} projector is answering…")
                state.conversations[key].answer(partial)
        except BaseException:
            # A failed or cancelled answer must not leave an open question behind (the next ask would refuse).
            for conv in state.conversations.values():
                if conv.turns and conv.turns[-1][1] is None:
                    conv.turns.pop()
            raise
        yield ChatUpdate(state, self.messages(state), "Done.")

    def _check_length(self, key: str, state: ChatState, question: str, settings: DecodingSettings) -> None:
        model = self.models[key]
        conv = Conversation(state.conversations[key].template, turns=list(state.conversations[key].turns))
        conv.ask(question)
        length = len(model.tokenizer(conv.prompt(), add_special_tokens=False).input_ids) + model.num_query_tokens
        limit = getattr(model.llm.config, "max_position_embeddings", None)
        if limit is not None and length + settings.max_new_tokens > limit:
            raise DemoInputError(f"The conversation is too long for the model ({length} prompt tokens + "
                                 f"{settings.max_new_tokens} new > {limit}). Clear the chat or lower max new tokens.")

    def _generate(self, key: str, state: ChatState, settings: DecodingSettings) -> Iterator[str]:
        """Yields the answer so far as it grows; the last value is the final, cleaned answer."""
        model = self.models[key]
        kwargs = dict(image_features=state.features, max_new_tokens=settings.max_new_tokens,
                      num_beams=settings.num_beams, do_sample=settings.do_sample,
                      temperature=settings.temperature, top_p=settings.top_p)
        prompt = state.conversations[key].prompt()
        if settings.num_beams > 1:  # transformers cannot stream beam search: answer in one piece
            yield model.generate([prompt], **kwargs)[0]
            return
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["answer"] = model.generate([prompt], streamer=streamer, **kwargs)[0]
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
                result["error"] = err
            finally:
                # Always unblock the consumer (generate ends the streamer itself on success; a failure or a
                # stand-in generate would not, and the loop below would wait for text forever).
                streamer.end()

        thread = threading.Thread(target=run, name=f"generate-{key}", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield visible_answer(text, model.end_sym)
        finally:
            # Also when the page cancels the answer (GeneratorExit here): generate cannot be interrupted, so
            # wait for it, or the next queued request would run the model concurrently with it.
            thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        yield str(result["answer"])

    # ------------------------------------------------------------------------------------ display
    def messages(self, state: ChatState, pending: dict[str, str] | None = None) -> dict[str, list[dict]]:
        """Chat histories in Gradio's messages format: answers HTML-escaped with CHAIR object words
        highlighted; `pending` holds an answer still streaming (shown plain, with a cursor)."""
        pending = pending or {}
        turns = {k: c.turns for k, c in state.conversations.items()}
        rendered = self._rendered_answers(turns)
        histories: dict[str, list[dict]] = {}
        for key, conv_turns in turns.items():
            history = []
            for i, (question, answer) in enumerate(conv_turns):
                history.append({"role": "user", "content": html.escape(question)})
                if answer is not None:
                    history.append({"role": "assistant", "content": rendered[key][i]})
                elif key in pending:
                    history.append({"role": "assistant", "content": html.escape(pending[key]) + " ▌"})
            histories[key] = history
        return histories

    def _rendered_answers(self, turns: dict[str, list[tuple[str, str | None]]]) -> dict[str, list[str]]:
        """Highlighted HTML per answer. When compare mode was on for the whole chat, turn i of both
        projectors answered the same question: those pairs also mark objects only one of them names."""
        scorer = self.scorer
        base, other = turns.get(BASE, []), turns.get(COMPARE, [])
        paired = bool(other) and len(base) == len(other)
        out: dict[str, list[str]] = {}
        for key, conv_turns in turns.items():
            out[key] = []
            for i, (_, answer) in enumerate(conv_turns):
                if answer is None:
                    out[key].append("")
                elif scorer is None:
                    out[key].append(html.escape(answer))
                elif paired and base[i][1] is not None and other[i][1] is not None:
                    first, second = highlight_pair(scorer, base[i][1], other[i][1])
                    out[key].append(first if key == BASE else second)
                else:
                    out[key].append(highlight_html(answer, object_mentions(scorer, answer)))
        return out


def visible_answer(text: str, end_sym: str) -> str:
    """What to show of a streaming answer: cut at the end string, and hide a trailing partial end string
    ("##" of "###") that may yet complete."""
    if end_sym and end_sym in text:
        return text.split(end_sym, 1)[0].strip()
    for n in range(min(len(end_sym), len(text)), 0, -1):
        if end_sym and text.endswith(end_sym[:n]):
            return text[:-n].strip()
    return text.strip()
