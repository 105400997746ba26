"""A named protocol as one evaluation runs it: the eval config's keys applied on top, labelled `NAME+overrides`.

`eval.pope.protocol` / `eval.chair.protocol` name a record of minigpt4/eval/protocols.py. These keys may be given
on top of it; each one left out (null) takes the protocol's value:
    eval.system, eval.prompt_format, eval.num_beams                              (both tasks)
    eval.pope.rule, eval.pope.max_new_tokens, eval.pope.question_suffix, eval.pope.question_cleaning
    eval.chair.question, eval.chair.max_new_tokens, eval.chair.images, eval.chair.num_images,
    eval.chair.sample_seed, eval.chair.sentences
A key whose value differs from the protocol's is an override. The run is then labelled `NAME+overrides` and
metrics.json lists each changed key as {"protocol": its value, "used": the config's}; it is never recorded under
the plain name. A key given with the protocol's own value changes nothing and is no override.

`eval.decoding: vcd` decodes with Visual Contrastive Decoding instead of the protocol's decoding (minigpt4/eval/vcd.py):
the label gains `+vcd(α=…,β=…,t=…,sample)` (e.g. `shapes-pope+vcd(α=1,β=0.2,t=500,sample)`) and the fingerprint
the parameters; a protocol that searches with beams cannot be decoded this way (a ConfigError). `eval.decoding:
opera` decodes with OPERA (minigpt4/eval/opera.py): `+opera(beams=5,…)`, with OPERA's beams and no stop string.

The prompt is the protocol's for the model family of `model.prompt_template` (vicuna_v0: MiniGPT-4, llava15:
LLaVA-1.5); another template needs eval.prompt_format (an override: no source prompted that model).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from minigpt4.common.config import ConfigError
from minigpt4.conversation.templates import IMAGE_PLACEHOLDER
from minigpt4.eval.decodings import Decoding, decoding_fields, decoding_label, decoding_record, resolve_decoding
from minigpt4.eval.opera import opera_protocol
from minigpt4.eval.protocols import (
    QUESTION_CLEANING,
    SENTENCE_HANDLING,
    ModelPrompt,
    Protocol,
    build_prompt,
    clean_answer,
    clean_question,
    get_protocol,
    handle_sentences,
    shipped_image_list,
)
from minigpt4.models.contrastive_decoding import ContrastiveDecoding
from minigpt4.models.opera import OperaDecoding

TEMPLATE_FAMILY = {"vicuna_v0": "minigpt4", "llava15": "llava15", "smollm2": "smollm2"}
POPE_RULES = ("reference", "first-sentence")
# config key -> field of the Protocol record it replaces (eval.system / eval.prompt_format replace ModelPrompt fields)
TASK_KEYS = {
    "pope": {"rule": "answer_rule", "max_new_tokens": "max_new_tokens", "question_suffix": "question_suffix",
             "question_cleaning": "question_cleaning"},
    "chair": {"question": "question", "max_new_tokens": "max_new_tokens", "num_images": "num_images",
              "sample_seed": "sample_seed", "sentences": "sentences"},
}
CHOICES = {"rule": POPE_RULES, "question_cleaning": QUESTION_CLEANING, "sentences": SENTENCE_HANDLING}
AT_LEAST_ONE = ("num_beams", "max_new_tokens", "num_images")


@dataclass(frozen=True)
class ProtocolRun:
    """What one task of this evaluation runs: the named record, the record with the config's keys applied, the
    prompt used, the CHAIR image list file (None: a seeded sample of eval.image_dir), the changed keys and the VCD
    parameters (None: the protocol's own decoding)."""

    named: Protocol
    used: Protocol
    prompt: ModelPrompt
    images: Optional[str]
    overrides: dict[str, dict[str, Any]]
    decoding: Optional[Decoding] = None

    @property
    def label(self) -> str:
        return (self.named.name + ("+overrides" if self.overrides else "") +
                (f"+{decoding_label(self.decoding)}" if self.decoding is not None else ""))

    @property
    def decoding_name(self) -> str:
        """greedy | beams=N (the protocol's own decoding) | vcd(α=…,β=…,t=…,sample) | opera(beams=…,…)."""
        if self.decoding is not None:
            return decoding_label(self.decoding)
        return "greedy" if self.used.num_beams == 1 else f"beams={self.used.num_beams}"

    def pope_prompt(self, question: str) -> str:
        asked = clean_question(question, self.used.question_cleaning) + self.used.question_suffix
        return build_prompt(self.prompt, asked)

    def chair_prompt(self) -> str:
        return build_prompt(self.prompt, self.used.question or "")

    def generate_kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.used.max_new_tokens, num_beams=self.used.num_beams,
                    min_new_tokens=self.prompt.min_new_tokens,
                    stop_strings=None if self.used.stop_at_end_string else [])  # None: the template's end string

    def clean_answer(self, answer: str) -> str:
        return clean_answer(answer, self.prompt)

    def caption_for_scoring(self, caption: str) -> str:
        return handle_sentences(caption, self.used.sentences)

    def summary(self) -> dict[str, Any]:
        """For metrics.json: which protocol, from where, and what was changed."""
        out: dict[str, Any] = {"name": self.named.name, "label": self.label, "source": self.named.source,
                               "cite": self.named.cite}
        if self.overrides:
            out["overrides"] = self.overrides
        out["decoding"] = self.decoding_name
        if self.decoding is not None:
            out["decoding_parameters"] = decoding_record(self.decoding)
        return out

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything of the run that decides an answer, under its config key (minigpt4/eval/fingerprint.py).
        Scoring-only fields (POPE rule, CHAIR sentence handling) and the image set (each stored answer names its
        image and is compared with the item asked) are left out."""
        task = self.used.task
        fields = {"eval.system": self.prompt.system, "eval.prompt_format": self.prompt.prompt_format,
                  "eval.num_beams": self.used.num_beams, f"eval.{task}.protocol": self.named.name,
                  f"eval.{task}.max_new_tokens": self.used.max_new_tokens,
                  f"eval.{task}.min_new_tokens": self.prompt.min_new_tokens,
                  f"eval.{task}.stop_at_end_string": self.used.stop_at_end_string,
                  f"eval.{task}.answer_cut": self.prompt.answer_cut,
                  f"eval.{task}.answer_tail": self.prompt.answer_tail}
        if task == "pope":
            fields.update({"eval.pope.question_suffix": self.used.question_suffix,
                           "eval.pope.question_cleaning": self.used.question_cleaning})
        else:
            fields["eval.chair.question"] = self.used.question
        if self.decoding is not None:  # the protocol's own decoding adds nothing: older fingerprints still match
            fields.update(decoding_fields(self.decoding))
        return fields


def _given(ev, task: str) -> dict[str, Any]:
    """The protocol keys the config sets (not null), by full key name."""
    sub = getattr(ev, task)
    given = {f"eval.{key}": getattr(ev, key) for key in ("system", "prompt_format", "num_beams")}
    given.update({f"eval.{task}.{key}": getattr(sub, key) for key in TASK_KEYS[task]})
    return {key: value for key, value in given.items() if value is not None}


def _check_values(given: dict[str, Any]) -> None:
    for key, value in given.items():
        short = key.rsplit(".", 1)[1]
        if short in AT_LEAST_ONE and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key} = {value}; expected an integer >= 1")
        if short in CHOICES and value not in CHOICES[short]:
            raise ConfigError(f"{key} = {value!r}; expected one of {', '.join(CHOICES[short])}")
    fmt = given.get("eval.prompt_format")
    if fmt is not None:
        try:
            marker = "\x00question\x00"
            text = build_prompt(ModelPrompt(system="", prompt_format=fmt), marker)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"eval.prompt_format = {fmt!r}: {err!r}; expected a format string with {{system}}, "
                              f"{{question}} and {IMAGE_PLACEHOLDER} once") from None
        if marker not in text:
            raise ConfigError(f"eval.prompt_format = {fmt!r} has no {{question}} field: every question would get "
                              "the same prompt")


def _prompt(named: Protocol, template: str, given: dict[str, Any], task: str,
            overrides: dict) -> ModelPrompt:
    """The prompt of `named` for the model family of `template`, with eval.system / eval.prompt_format on top."""
    base = dict(named.prompts).get(TEMPLATE_FAMILY.get(template))
    if base is None and "eval.prompt_format" not in given:
        raise ConfigError(f"eval.{task}.protocol = {named.name} has no prompt for model.prompt_template = "
                          f"{template!r} (it prompts: {', '.join(named.families)}); name another protocol or "
                          "give eval.prompt_format (recorded as an override)")
    for key in ("system", "prompt_format"):
        protocol_value = getattr(base, key) if base is not None else None
        if f"eval.{key}" in given and given[f"eval.{key}"] != protocol_value:
            overrides[f"eval.{key}"] = {"protocol": protocol_value, "used": given[f"eval.{key}"]}
    base = base or ModelPrompt(system="", prompt_format="")
    prompt = dataclasses.replace(base, system=given.get("eval.system", base.system),
                                 prompt_format=given.get("eval.prompt_format", base.prompt_format))
    if given.get("eval.system") and "{system}" not in prompt.prompt_format:
        raise ConfigError(f"eval.system is set but the prompt format of {named.name} has no {{system}} field: "
                          "the text would be dropped; give eval.prompt_format with {system}")
    return prompt


def _chair_images(named: Protocol, chair, overrides: dict) -> Optional[str]:
    given = chair.images
    if named.image_set == "user-list":
        if given is None:
            raise ConfigError(f"eval.chair.images: protocol {named.name} runs on a list of images you give (a JSON "
                              "list of {\"image_id\": ...} objects, or a text file with one id or file name a line)")
        return given
    shipped = shipped_image_list() if named.image_set == "opera-500" else None
    if given is not None and (shipped is None or os.path.realpath(given) != os.path.realpath(shipped)):
        overrides["eval.chair.images"] = {"protocol": shipped or "a seeded sample of eval.image_dir", "used": given}
        return given
    return shipped


def _record_changes(named: Protocol, task: str, given: dict[str, Any], overrides: dict,
                    images_replaced: bool) -> dict[str, Any]:
    """Record field -> the config's value, for each record key the config gives; the changed ones go into
    `overrides`. A list replacing the protocol's images is taken whole unless eval.chair.num_images says otherwise."""
    key_of = {field: f"eval.{task}.{key}" for key, field in TASK_KEYS[task].items()}
    key_of["num_beams"] = "eval.num_beams"
    changes = {field: given[key] for field, key in key_of.items() if key in given}
    for field, value in changes.items():
        if value != getattr(named, field):
            overrides[key_of[field]] = {"protocol": getattr(named, field), "used": value}
    if images_replaced and "num_images" not in changes:
        changes["num_images"] = None
    return changes


def resolve_run(ev, task: str, template: str) -> ProtocolRun:
    """The run of `task` ("pope" or "chair") under the `eval:` section `ev` (DictConfig or EvalSettings)."""
    try:
        named = get_protocol(getattr(ev, task).protocol, task)
    except KeyError as err:
        raise ConfigError(f"eval.{task}.protocol: {err.args[0]}") from None
    given = _given(ev, task)
    _check_values(given)
    overrides: dict[str, dict[str, Any]] = {}
    prompt = _prompt(named, template, given, task, overrides)
    images = _chair_images(named, ev.chair, overrides) if task == "chair" else None
    changes = _record_changes(named, task, given, overrides, images_replaced="eval.chair.images" in overrides)
    used = dataclasses.replace(named, **changes)
    decoding = resolve_decoding(ev, task)
    if isinstance(decoding, OperaDecoding):
        used = opera_protocol(used, decoding, given)
    if isinstance(decoding, ContrastiveDecoding) and used.num_beams != 1:
        where = "eval.num_beams" if "eval.num_beams" in given else f"eval.{task}.protocol = {named.name}"
        raise ConfigError(f"eval.decoding = vcd decodes one token per step, but {where} searches with num_beams = "
                          f"{used.num_beams}; use eval.decoding = greedy, or a protocol (or eval.num_beams) of 1 beam")
    return ProtocolRun(named=named, used=used, prompt=prompt, images=images, overrides=overrides, decoding=decoding)


def protocol_runs(ev, template: str) -> dict[str, ProtocolRun]:
    """task -> its run, for every task of `ev.tasks`; ConfigError naming the key for a bad name or value."""
    return {task: resolve_run(ev, task, template) for task in ("pope", "chair") if task in ev.tasks}
