"""The decodings a protocol can be run with (`eval.decoding`): the protocol's own (`greedy`: greedy or its beam
search), Visual Contrastive Decoding (`vcd`, minigpt4/eval/vcd.py) or OPERA (`opera`, minigpt4/eval/opera.py).
One place for the key's check and for what each decoding adds to a run: its label, its record in metrics.json,
its fingerprint fields and which generate answers a batch (`generate_answers`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch

from minigpt4.common.config import ConfigError
from minigpt4.eval.opera import check_opera, generate_with_opera, opera_label, opera_record, resolve_opera
from minigpt4.eval.vcd import check_vcd, generate_vcd, resolve_vcd, vcd_label, vcd_record
from minigpt4.models.contrastive_decoding import ContrastiveDecoding
from minigpt4.models.opera import OperaDecoding

DECODINGS = ("greedy", "vcd", "opera")
Decoding = Union[ContrastiveDecoding, OperaDecoding]


def check_decoding(ev) -> None:
    """eval.decoding, and every eval.vcd / eval.opera key whatever the decoding; ConfigError naming the key."""
    name = ev.decoding
    if name not in DECODINGS:
        if all(method in str(name).lower() for method in ("vcd", "opera")):
            raise ConfigError(f"eval.decoding = {name!r}: VCD (eval.vcd) and OPERA (eval.opera) cannot decode "
                              "together (VCD draws one token per step from two image streams, OPERA is a beam "
                              "search over one); choose eval.decoding = vcd or eval.decoding = opera")
        raise ConfigError(f"eval.decoding = {name!r}; expected one of {', '.join(DECODINGS)}")
    check_vcd(ev)
    check_opera(ev)


def resolve_decoding(ev, task: str) -> Optional[Decoding]:
    """The decoding `task` runs with, or None for the protocol's own."""
    check_decoding(ev)
    if ev.decoding == "vcd":
        return resolve_vcd(ev, task)
    if ev.decoding == "opera":
        return resolve_opera(ev)
    return None


def decoding_name(decoding: Decoding) -> str:
    return "opera" if isinstance(decoding, OperaDecoding) else "vcd"


def decoding_label(decoding: Decoding) -> str:
    """vcd(α=1,β=0.2,t=500,sample) | opera(beams=5,scale=50,threshold=15,candidates=5,penalty=1,window=512)"""
    return opera_label(decoding) if isinstance(decoding, OperaDecoding) else vcd_label(decoding)


def decoding_record(decoding: Decoding) -> dict[str, Any]:
    return opera_record(decoding) if isinstance(decoding, OperaDecoding) else vcd_record(decoding)


def decoding_fields(decoding: Decoding) -> dict[str, Any]:
    """The resume fingerprint's fields of a decoding: eval.decoding and every parameter as run."""
    name = decoding_name(decoding)
    return {"eval.decoding": name,
            **{f"eval.{name}.{key}": value for key, value in dataclasses.asdict(decoding).items()}}


def generate_answers(model, prompts: list[str], images: torch.Tensor, *, decoding: Optional[Decoding],
                     image_features: bool, item_keys: list[str], **generate_kwargs: Any) -> list[str]:
    """One batch's answers, and the one place that says which generate runs: the model's own (`decoding` None:
    greedy or the protocol's beams), VCD's (`images` are ImagePairs' (B, 2, ...) pairs) or OPERA's.
    `image_features`: `images` are the encoder's outputs from the feature cache, not pixels. `item_keys` seed
    VCD's draws per item; `generate_kwargs` are the protocol run's (ProtocolRun.generate_kwargs)."""
    if isinstance(decoding, ContrastiveDecoding):
        return generate_vcd(model, prompts, images, decoding, item_keys=item_keys, image_features=image_features,
                            **generate_kwargs)
    if isinstance(decoding, OperaDecoding):
        return generate_with_opera(model, prompts, images, decoding, image_features=image_features,
                                   **generate_kwargs)
    if image_features:
        return model.generate(prompts, image_features=images, **generate_kwargs)
    return model.generate(prompts, images, **generate_kwargs)
