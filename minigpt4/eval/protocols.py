"""Named evaluation protocols: everything that produces the outputs a scorer reads, as each source runs it.

    python -m minigpt4.eval.protocols                    # every protocol and its source
    python -m minigpt4.eval.protocols NAME --tokenizer DIR [--arch minigpt4|llava15] [--question TEXT]

The scorers are exact (chair.py, pope.py); a published number is reproduced only if the answers are produced the
way its source produced them too. A protocol is a frozen record of that: the system text and prompt format of each
model family, how a question is cleaned, where the source tokenized the prompt apart (`SEGMENT_BREAK` in the
format; the image is always a boundary; BOS in front of the first segment), the image set, the generation settings
(max new tokens, beams, min new tokens, stop strings), answer post-processing, the POPE answer rule and the CHAIR
sentence handling. Each record names the source files it was read from. The second command prints what one
protocol feeds a model: the exact token ids before and after the visual tokens, BOS included.

Eval configs name one per task (`eval.pope.protocol`, `eval.chair.protocol`); minigpt4/eval/protocol_runs.py applies
the keys a config gives on top and labels such a run `NAME+overrides`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

from minigpt4.conversation.templates import IMAGE_PLACEHOLDER, SEGMENT_BREAK, format_eval_prompt
from minigpt4.processors.text import BlipCaptionProcessor

# MiniGPT-4 on Vicuna v0 (template vicuna_v0) | LLaVA-1.5 on Vicuna v1.5 | MiniGPT-4 on SmolLM2-135M-Instruct
# (template smollm2: eval_configs/real_small_base.yaml, shapes world only)
FAMILIES = ("minigpt4", "llava15", "smollm2")
QUESTION_CLEANING = ("none", "blip_caption")
SENTENCE_HANDLING = ("keep", "drop-unfinished", "drop-unk")
IMAGE_SETS = ("pope-questions", "sample", "user-list", "opera-500")
OPERA_500_FILE = "opera_500_val2014_image_ids.txt"

# System texts, character for character (trailing spaces matter: they are tokenized).
ADAVIB_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. Please answer the question. ")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
LLAVA_POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
OPERA_INSTRUCTION = "Please describe this image in detail."
# The smollm2 template's Template.prompt (BOS "<|im_start|>" comes first): ChatML without a system turn.
_SMOLLM2_SHAPES = "{system}user\n<Img><ImageHere></Img> {question}<|im_end|>\n<|im_start|>assistant\n"



@dataclass(frozen=True)
class ModelPrompt:
    """How a source prompted one model family, and how it cleaned that model's decoded answer."""

    system: str
    prompt_format: str  # {system}, {question}, <ImageHere> once; SEGMENT_BREAK where the source tokenized apart
    min_new_tokens: int = 0  # the source's min_length (with inputs_embeds in transformers 4.28: new tokens)
    answer_cut: Optional[str] = None  # keep the text before its first occurrence (after the model's end string)
    answer_tail: Optional[str] = None  # then keep the text after its last occurrence


@dataclass(frozen=True)
class Protocol:
    name: str
    task: str  # pope | chair
    source: str  # repository:path of every file the record was read from
    description: str
    prompts: tuple[tuple[str, ModelPrompt], ...]  # (family, prompt) for each family the source ran
    max_new_tokens: int
    num_beams: int = 1
    stop_at_end_string: bool = True  # False: generate to EOS / max_new_tokens (no stop strings), as the source
    question: Optional[str] = None  # CHAIR: the instruction; POPE: None (each question comes from its file)
    question_cleaning: str = "none"  # none | blip_caption (lower-cased, . ! " ( ) * # : ; ~ removed)
    question_suffix: str = ""  # appended to every POPE question after cleaning
    answer_rule: Optional[str] = None  # POPE: reference | first-sentence (pope.py)
    image_set: str = "pope-questions"  # pope-questions | sample (seeded, of eval.image_dir) | user-list | opera-500
    num_images: Optional[int] = None  # CHAIR: sample size or cap of the list (None: all)
    sample_seed: int = 0
    sentences: str = "keep"  # CHAIR: keep | drop-unfinished (cut after the last ".") | drop-unk (HALC)

    def prompt_for(self, family: str) -> ModelPrompt:
        prompts = dict(self.prompts)
        if family not in prompts:
            raise KeyError(f"protocol {self.name} has no prompt for {family} (it has: {', '.join(prompts)})")
        return prompts[family]

    @property
    def cite(self) -> str:
        """The source in short: its repository and first file (the full list is `source`)."""
        return self.source.split(" (", 1)[0]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(family for family, _ in self.prompts)


def shipped_image_list(name: str = OPERA_500_FILE) -> str:
    """Path of an image-id list shipped in the package (minigpt4/eval/data/chair/)."""
    path = resources.files("minigpt4.eval") / "data" / "chair" / name
    if not path.is_file():
        raise FileNotFoundError(f"the package has no shipped image list {path}; reinstall the project")
    return str(path)


def clean_question(text: str, cleaning: str) -> str:
    if cleaning == "blip_caption":  # LAVIS BlipCaptionProcessor, max_words 50 (AdaVIB's text_processor)
        return BlipCaptionProcessor().clean(text)
    if cleaning == "none":
        return text
    raise ValueError(f"unknown question cleaning {cleaning!r}; expected one of {', '.join(QUESTION_CLEANING)}")


def clean_answer(answer: str, prompt: ModelPrompt) -> str:
    """The source's post-processing of a decoded answer (the model has already cut at its end string)."""
    if prompt.answer_cut:
        answer = answer.split(prompt.answer_cut, 1)[0]
    if prompt.answer_tail:
        answer = answer.split(prompt.answer_tail)[-1]
    return answer.strip()


def handle_sentences(caption: str, mode: str) -> str:
    """CHAIR sentence handling of a caption before scoring (unfinished last sentences matter at 64 tokens)."""
    if mode == "keep":  # OPERA chair.py and HALC eval/chair.py: their cut at the last "." is commented out
        return caption
    if mode == "drop-unfinished":  # that commented-out cut: `cap[:cap.rfind('.') + 1]` ("" if there is no ".")
        return caption[: caption.rfind(".") + 1]
    if mode == "drop-unk":  # HALC chair_eval.py: split at ".", drop every piece containing "unk", join with "."
        return ".".join(piece for piece in caption.split(".") if "unk" not in piece)
    raise ValueError(f"unknown sentence handling {mode!r}; expected one of {', '.join(SENTENCE_HANDLING)}")


def build_prompt(prompt: ModelPrompt, question: str) -> str:
    """The prompt string a model's generate() takes: <ImageHere> once, SEGMENT_BREAK between segments."""
    return format_eval_prompt(prompt.prompt_format, system=prompt.system, question=question)


# --------------------------------------------------------------------------------------------- the records
_ADAVIB_DEFECTS = (
    " Not reproduced, being defects of the released code: the stop criterion of the source looked at the first row of "
    "a batch only and its answers were parsed from the raw decoded text; here every row stops on its own and answers "
    "are cut at '###'.")
_OPERA_MINIGPT4 = ModelPrompt(system="",
                              prompt_format="{system}###Human: <Img><ImageHere></Img> {question} ###Assistant:",
                              min_new_tokens=1, answer_cut="###", answer_tail="Assistant:")
_OPERA_LLAVA15 = ModelPrompt(system=VICUNA_V1_SYSTEM, prompt_format="{system}USER: <ImageHere> {question} ASSISTANT:",
                             answer_cut="###")
_OPERA_SOURCES = ("shikiw/OPERA: eval_configs/minigpt4_eval.yaml (no system text), eval_configs/llava-1.5_eval.yaml "
                  "(system_message), minigpt4/models/mini_gpt4.py (prompt_wrap: text before/after the image "
                  "tokenized apart, BOS embedding first, min_length=1, answer split('###')[0].split('Assistant:')"
                  "[-1]), minigpt4/models/llava.py (system_message + prompt, BOS + text before the image, no "
                  "min_length, answer split('###')[0])")
_OPERA_PROMPTS_NOTE = (
    " MiniGPT-4: '###Human: <Img><ImageHere></Img> {instruction} ###Assistant:' with no system text; LLaVA-1.5: "
    "'USER: <ImageHere> {instruction} ASSISTANT:' right after the system text of llava-1.5_eval.yaml, with no space "
    "between them ('…questions.USER:'), as OPERA concatenates them. OPERA's LLaVA images are resized and "
    "centre-cropped by CLIPImageProcessor, not padded to a square: set eval.vis_processor to match if that matters.")
_OPERA_CHAIR = dict(
    task="chair", prompts=(("minigpt4", _OPERA_MINIGPT4), ("llava15", _OPERA_LLAVA15)), question=OPERA_INSTRUCTION,
    image_set="opera-500")
_OPERA_CHAIR_SOURCE = ("shikiw/OPERA: chair_eval.py (INSTRUCTION_TEMPLATE, 'Please describe this image in detail.', "
                       "max_new_tokens=512, 500 images), chair.py (no sentence cut); " + _OPERA_SOURCES
                       + "; log/chair_eval_results/minigpt4/greedy.jsonl (the 500 image ids, shipped as "
                       "minigpt4/eval/data/chair/" + OPERA_500_FILE + ")")
_LLAVA15_SOURCE = ("haotian-liu/LLaVA: scripts/v1_5/eval/pope.sh (--temperature 0 --conv-mode vicuna_v1), "
                   "llava/eval/model_vqa_loader.py ('<image>\\n' + question, max_new_tokens 128, num_beams 1, decoded "
                   "answer stripped), llava/conversation.py (conv_vicuna_v1), llava/mm_utils.py "
                   "(tokenizer_image_token: text before and after the image tokenized apart, BOS on the first), "
                   "llava/eval/eval_pope.py (the first-sentence rule)")
# The shapes world's two protocols: one source, and the prompts its base models were trained with
_SHAPES_SOURCE = "this repository: minigpt4/shapes/world/scenes.py, assets/shapes_base (the toy world's base model)"
_SHAPES_PROMPTS = (("minigpt4", ModelPrompt(system="", prompt_format="{system}###Human: <Img><ImageHere></Img> "
                                                                     "{question} ###Assistant: ")),
                   ("smollm2", ModelPrompt(system="", prompt_format=_SMOLLM2_SHAPES)))
_HARNESS = ("this repository before issue 14 (minigpt4/eval/tasks.py REFERENCE_SYSTEM / REFERENCE_PROMPT, "
            "eval_configs/*)")
_SINGLE_STRING = (
    ("minigpt4", ModelPrompt(system=ADAVIB_SYSTEM, prompt_format="{system}###Human: <Img><ImageHere></Img> {question}"
                                                                 "###Assistant:")),
    ("llava15", ModelPrompt(system=LLAVA_V1_SYSTEM, prompt_format="{system} USER: <ImageHere>\n{question} ASSISTANT:")))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(
        name="adavib-pope", task="pope",
        source=("jiaqi5598/AdaVIB: pope_eval.py (PROMPT, get_context_embeds, post_process_output, max_new_tokens=10, "
                "num_beams=1, min_length=1), minigpt4/datasets/datasets/caption_datasets.py (PopeEvalDataset: the "
                "question through text_processor, then tokenized on its own), minigpt4_configs/minigpt4_pope_eval.yaml "
                "(text_processor blip_caption)"),
        description=(
            "AdaVIB's POPE run on MiniGPT-4. System text with 'Please answer the question.', the question cleaned "
            "by blip_caption (lower-cased, punctuation removed, '?' kept), and the prompt built from separately "
            "tokenized segments, BOS on the first only: '{system}###Human: <Img>' | image | '</Img> ' | question | "
            "'###Assistant:'. Greedy, 10 new tokens, at least 1, the reference rule. The source right-pads the "
            "questions of a batch inside the prompt and feeds them without an attention mask, so an answer "
            "depends on the other questions of its batch: a defect, not reproduced (each prompt is built alone; "
            "batches are left-padded with a mask)." + _ADAVIB_DEFECTS),
        prompts=(("minigpt4", ModelPrompt(
            system=ADAVIB_SYSTEM, min_new_tokens=1,
            prompt_format=f"{{system}}###Human: <Img><ImageHere></Img> {SEGMENT_BREAK}{{question}}{SEGMENT_BREAK}"
                          "###Assistant:")),),
        max_new_tokens=10, question_cleaning="blip_caption", answer_rule="reference"),
    Protocol(
        name="adavib-chair", task="chair",
        source=("jiaqi5598/AdaVIB: coco_eval.py (PROMPT, get_context_embeds: text before/after the image tokenized "
                "apart, BOS on the first; post_process_output; max_new_tokens=256, num_beams=1, min_length=1), "
                "minigpt4/datasets/datasets/caption_datasets.py (CaptionEvalDataset: the images of eval.json, "
                "'{image_id:0>12}.jpg')"),
        description=(
            "AdaVIB's CHAIR captions on MiniGPT-4: its POPE system text, 'Describe this image.' right before "
            "'###Assistant:', greedy, 256 new tokens, at least 1; the answer is cut at '###' and the text after "
            "the last 'Assistant:' kept. The images are the authors' eval.json, which is not public: give your "
            "list in eval.chair.images (a JSON list of {\"image_id\"} as eval.json, or a text file of ids)."
            + _ADAVIB_DEFECTS),
        prompts=(("minigpt4", ModelPrompt(
            system=ADAVIB_SYSTEM, prompt_format="{system}###Human: <Img><ImageHere></Img> {question}###Assistant:",
            min_new_tokens=1, answer_cut="###", answer_tail="Assistant:")),),
        max_new_tokens=256, question="Describe this image.", image_set="user-list"),
    Protocol(
        name="opera-chair-500", **_OPERA_CHAIR, source=_OPERA_CHAIR_SOURCE, max_new_tokens=512,
        description=("OPERA's CHAIR baseline with greedy decoding (its released greedy.jsonl): 'Please describe "
                     "this image in detail.' on the exact 500 val2014 images of OPERA's released results, in their "
                     "order, 512 new tokens; the caption is scored as generated, unfinished last sentence included."
                     + _OPERA_PROMPTS_NOTE + " OPERA generates without a stop string and cuts at '###'; under "
                     "greedy decoding stopping at the end string gives the same text, so it stops there.")),
    Protocol(
        name="opera-chair-500-beam5", **_OPERA_CHAIR, source=_OPERA_CHAIR_SOURCE + "; its beam5.jsonl",
        max_new_tokens=512, num_beams=5, stop_at_end_string=False,
        description=("OPERA's beam-search baseline (its released beam5.jsonl): as opera-chair-500 with plain beam "
                     "search over 5 beams, generated to EOS or 512 tokens without a stop string (a stop string "
                     "would change which beams finish), then cut at '###'." + _OPERA_PROMPTS_NOTE)),
    Protocol(
        name="opera-chair-500-64tok", **_OPERA_CHAIR, max_new_tokens=64,
        source=(_OPERA_CHAIR_SOURCE + "; BillChan226/HALC: chair_eval.py (--max_new_tokens default 64; its captions "
                "split at '.', every piece containing 'unk' dropped), eval/chair.py (no sentence cut)"),
        description=("The short 64-token CHAIR setting of the OPERA and HALC tables, on OPERA's 500 images and "
                     "prompts. Most captions stop mid-sentence. OPERA's chair.py scores that unfinished sentence (its "
                     "cut at the last '.' is commented out), and so does HALC's eval/chair.py; HALC's chair_eval.py "
                     "instead drops every '.'-separated piece that contains 'unk' before saving a caption (with "
                     "special tokens skipped in decoding that also drops sentences with words such as 'trunk'). "
                     "Default: keep (OPERA). eval.chair.sentences = drop-unk gives HALC's treatment, drop-unfinished "
                     "the commented-out cut; either is recorded as an override." + _OPERA_PROMPTS_NOTE)),
    Protocol(
        name="opera-pope", task="pope",
        source=("shikiw/OPERA: pope_eval.py at commit 54485d3 (INSTRUCTION_TEMPLATE, max_new_tokens=10, recorder = "
                "the reference rule; the earlier 2a0a234 asked 512 tokens and could not run: it read args.pope), "
                "pope_loader.py (the question text as it is); " + _OPERA_SOURCES),
        description=("OPERA's POPE run with greedy decoding: each question as written, in OPERA's per-model "
                     "template, 10 new tokens, the reference rule." + _OPERA_PROMPTS_NOTE.replace("{instruction}",
                                                                                                  "{question}")),
        prompts=(("minigpt4", _OPERA_MINIGPT4), ("llava15", _OPERA_LLAVA15)), max_new_tokens=10,
        answer_rule="reference"),
    Protocol(
        name="llava15-pope", task="pope", source=_LLAVA15_SOURCE,
        description=("LLaVA-1.5's official POPE evaluation (the 85.9 mean F1 of its model zoo): conv_vicuna_v1 "
                     "('…a curious user… the user's questions', not llava_v1's '…human…'), each question followed by "
                     "'\\nAnswer the question using a single word or phrase.' (LLaVA's llava_pope_test.jsonl has it in "
                     "the question text), temperature 0 (greedy), 128 new tokens, EOS the only stop, the "
                     "first-sentence rule of eval_pope.py. Use the coco-2023-08 questions (eval.pope.version): "
                     "llava_pope_test.jsonl holds their 8,910."),
        prompts=(("llava15", ModelPrompt(system=VICUNA_V1_SYSTEM,
                                         prompt_format="{system} USER: <ImageHere>\n{question} ASSISTANT:")),),
        max_new_tokens=128, question_suffix=LLAVA_POPE_SUFFIX, answer_rule="first-sentence"),
    Protocol(
        name="single-string-pope", task="pope", source=_HARNESS, prompts=_SINGLE_STRING, max_new_tokens=10,
        question_suffix="", answer_rule="reference",
        description=("This harness's POPE prompt before named protocols, kept for comparison: MiniGPT-4 gets "
                     "AdaVIB's text with the question as written and everything after the image tokenized as one "
                     "string; LLaVA-1.5 gets llava_v1's '…curious human…' system text; 10 new tokens, the reference "
                     "rule. The default when a config names no POPE protocol.")),
    Protocol(
        name="describe-sampled-500", task="chair", source=_HARNESS, prompts=_SINGLE_STRING, max_new_tokens=512,
        question="Describe this image.", image_set="sample", num_images=500, sample_seed=0,
        description=("This harness's CHAIR captions before named protocols (the eval configs called them "
                     "'opera-500img-512tok', which they are not): AdaVIB's 'Describe this image.' on 500 images "
                     "sampled from eval.image_dir with seed 0, 512 new tokens. The default when a config names no "
                     "CHAIR protocol.")),
    Protocol(
        name="shapes-pope", task="pope", max_new_tokens=10, answer_rule="reference",
        source=_SHAPES_SOURCE,
        description=("POPE on the generated shapes world: the vicuna_v0 training prompt of assets/shapes_base "
                     "exactly (Template.prompt), with no system text: the model was trained without one. "
                     "SmolLM2 (assets/real_small_base): its smollm2 training prompt, likewise."),
        prompts=_SHAPES_PROMPTS),
    Protocol(
        name="shapes-chair", task="chair", max_new_tokens=64, question="Describe this image.", image_set="user-list",
        source=_SHAPES_SOURCE,
        description=("CHAIR on the generated shapes world: its val images (eval.chair.images), the training prompt "
                     "of assets/shapes_base (SmolLM2: of assets/real_small_base) without system text, 64 new tokens "
                     "(captions are at most ~40)."),
        prompts=_SHAPES_PROMPTS),
)}


def get_protocol(name: str, task: Optional[str] = None) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)} (python -m minigpt4.eval.protocols)")
    protocol = PROTOCOLS[name]
    if task is not None and protocol.task != task:
        raise KeyError(f"protocol {name} is a {protocol.task} protocol, not a {task} one; {task} protocols: "
                       + ", ".join(p.name for p in PROTOCOLS.values() if p.task == task))
    return protocol


# ------------------------------------------------------------------------------------------- command line
def describe_ids(protocol: Protocol, family: str, tokenizer_dir: str, question: Optional[str]) -> dict:
    """What `protocol` feeds a `family` model for one question: text, segments and the exact token ids."""
    from minigpt4.models.loading import load_tokenizer
    from minigpt4.models.tokenization import SegmentTokenizer

    prompt = protocol.prompt_for(family)
    if protocol.task == "pope":
        asked = clean_question(question or "Is there a dog in the image?", protocol.question_cleaning)
        asked += protocol.question_suffix
    elif question is not None:
        raise ValueError(f"{protocol.name} is a CHAIR protocol: it asks its own instruction ({protocol.question!r})")
    else:
        asked = protocol.question
    text = build_prompt(prompt, asked)
    encoder = SegmentTokenizer(load_tokenizer(tokenizer_dir))
    before, after = encoder.prompt_ids(text)
    return {
        "name": protocol.name, "source": protocol.source, "arch": family, "max_new_tokens": protocol.max_new_tokens,
        "num_beams": protocol.num_beams, "min_new_tokens": prompt.min_new_tokens,
        "stop_at_end_string": protocol.stop_at_end_string, "answer_rule": protocol.answer_rule,
        "prompt_text": text.replace(SEGMENT_BREAK, ""),
        "segments": [seg for side in text.split(IMAGE_PLACEHOLDER) for seg in side.split(SEGMENT_BREAK)],
        "tokenizer": "sentencepiece" if encoder.uses_sentencepiece else "transformers",
        "before_image": before, "after_image": after,
    }


def list_protocols() -> str:
    width = max(len(name) for name in PROTOCOLS)
    lines = [f"{'name':<{width}}  task   models            source"]
    for p in PROTOCOLS.values():
        lines.append(f"{p.name:<{width}}  {p.task:<5}  {','.join(p.families):<16}  {p.source}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="List the evaluation protocols, or show what one feeds a model.")
    ap.add_argument("name", nargs="?", help="a protocol name; none: list them all")
    ap.add_argument("--tokenizer", help="the model's tokenizer folder (tokenizer.model + tokenizer_config.json)")
    ap.add_argument("--arch", default="minigpt4", choices=FAMILIES)
    ap.add_argument("--question", help="a POPE question (default: 'Is there a dog in the image?')")
    args = ap.parse_args(argv)
    if args.name is None:
        print(list_protocols())
        return 0
    if args.tokenizer is None:
        print("error: --tokenizer DIR is needed to show the token ids", file=sys.stderr)
        return 2
    from minigpt4.common.config import ConfigError

    try:
        shown = describe_ids(get_protocol(args.name), args.arch, args.tokenizer, args.question)
    except (KeyError, ValueError, ConfigError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(json.dumps(shown, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
