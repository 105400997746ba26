"""Prompt templates and multi-turn chat state.

A template knows three things: how a human turn is written around the image placeholder, how the
assistant's turn starts, and the end string that closes a turn (and stops generation). `<ImageHere>` marks
where the soft visual tokens go; the model splits the prompt there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TAG = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
# Between two parts of a prompt that are tokenized separately (each gets SentencePiece's leading "▁"), as
# reference code that tokenized the question apart from the text around it did (minigpt4/eval/protocols.py).
# The image placeholder is always such a boundary. ASCII "unit separator": never part of a prompt's text.
SEGMENT_BREAK = "\x1f"


@dataclass(frozen=True)
class Template:
    name: str
    human: str  # prefix of a human turn
    assistant: str  # what follows the human message and precedes the answer
    end_sym: str  # closes the answer in training; generation stops on it
    image: str = IMAGE_TAG  # how the image is written inside the first human turn
    turn_sep: str = ""  # between a finished answer and the next human turn
    image_sep: str = " "  # between the image and the text of the first turn (LLaVA: a newline)

    def prompt(self, instruction: str | None) -> str:
        """Single-turn training/eval prompt. `instruction=None` is the caption-only form used by the AdaVIB
        fine-tune (MiniGPT-4 stage 2 and AdaVIB): `###Human: <Img>…</Img> ` followed directly by the caption, no
        assistant prefix."""
        if instruction is None:
            return f"{self.human}{self.image}{self.image_sep}" if self.image else ""
        return f"{self.human}{self.first_turn(instruction)}{self.assistant}"

    def first_turn(self, text: str) -> str:
        return f"{self.image}{self.image_sep}{text}" if self.image else text


TEMPLATES: dict[str, Template] = {
    # MiniGPT-4 v0 (Vicuna v0): "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", end "###".
    "vicuna_v0": Template("vicuna_v0", human="###Human: ", assistant=" ###Assistant: ", end_sym="###"),
    # MiniGPT-4 Llama-2 variant: "[INST] <Img><ImageHere></Img> {instruction} [/INST] ", end "</s>".
    "llama2": Template("llama2", human="[INST] ", assistant=" [/INST] ", end_sym="</s>", turn_sep=" "),
    # Stage-1 alignment pre-training: [BOS] <image tokens> caption "\n"; no words around the image.
    "plain": Template("plain", human="", assistant="", end_sym="\n", image=IMAGE_PLACEHOLDER),
    # LLaVA-1.5 (Vicuna v1.5): "USER: <image>\n{prompt} ASSISTANT:", end "</s>" (conv_vicuna_v1 separators).
    "llava15": Template("llava15", human="USER: ", assistant=" ASSISTANT:", end_sym="</s>",
                        image=IMAGE_PLACEHOLDER, turn_sep=" ", image_sep="\n"),
    # SmolLM2-Instruct's ChatML (the chat template in its GGUF file), without its default system turn:
    # "<|im_start|>user\n<Img><ImageHere></Img> {instruction}<|im_end|>\n<|im_start|>assistant\n", end "<|im_end|>".
    # Its BOS is "<|im_start|>", and every prompt here starts with BOS, so the first turn's text begins at "user";
    # each later turn opens its own "<|im_start|>" (turn_sep).
    "smollm2": Template("smollm2", human="user\n", assistant="<|im_end|>\n<|im_start|>assistant\n",
                        end_sym="<|im_end|>", turn_sep="\n<|im_start|>"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def format_eval_prompt(fmt: str, *, system: str = "", question: str = "") -> str:
    """Evaluation prompts are explicit format strings in the eval configs (the POPE/CHAIR reference prompt
    differs from the chat template by a space), e.g. "{system}###Human: <Img><ImageHere></Img> {question}###Assistant:".
    """
    text = fmt.format(system=system, question=question)
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"an eval prompt must contain {IMAGE_PLACEHOLDER} exactly once: {fmt!r}")
    return text


@dataclass
class Conversation:
    """Multi-turn chat state for the demo. The image goes into the first human turn."""

    template: Template
    system: str = ""
    turns: list[tuple[str, str | None]] = field(default_factory=list)  # (question, answer or None)

    def ask(self, question: str) -> None:
        if self.turns and self.turns[-1][1] is None:
            raise ValueError("the previous question has no answer yet")
        self.turns.append((question, None))

    def answer(self, text: str) -> None:
        if not self.turns or self.turns[-1][1] is not None:
            raise ValueError("no open question to answer")
        self.turns[-1] = (self.turns[-1][0], text)

    def prompt(self) -> str:
        """The prompt for the model's next answer (ends with the assistant prefix)."""
        t = self.template
        parts = [self.system]
        for i, (question, answer) in enumerate(self.turns):
            body = t.first_turn(question) if i == 0 else question
            parts.append(f"{t.human}{body}{t.assistant}")
            if answer is not None:
                # In Vicuna v0 the end string "###" is also how the next human turn begins: write it once.
                closing = "" if t.human.startswith(t.end_sym) else t.end_sym
                parts.append(f"{answer}{closing}{t.turn_sep}")
        return "".join(parts)
