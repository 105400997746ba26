"""OPERA as a decoding option of the evaluation (`eval.decoding: opera`, parameters `eval.opera`).

    eval.decoding = opera    OPERA (minigpt4/models/opera.py) with eval.opera.*, on the protocol's prompts, images,
                             token limit and scorers; labelled NAME+opera(beams=5,scale=50,threshold=15,...)

Defaults are shikiw/OPERA's (its generate's arguments, chair_eval.py and the README's commands): 5 beams,
scale_factor 50, threshold 15, 5 candidates, penalty_weights 1, window_size 512. `eval.opera.setting: fast` is
the faster setting the issue quotes from the README (threshold 25, 1 candidate); `threshold` and
`num_attn_candidates`, when given, override either setting.

Under OPERA a task's beams are eval.opera.num_beams, and each hypothesis ends at EOS or at the protocol's token
limit: the source's generate has no stop string (its answers are cut at '###' afterwards, as the protocols' answer
cut does), and a stop string would change which beams finish (as for protocol opera-chair-500-beam5). The run's
record says so: eval.num_beams is OPERA's and stop_at_end_string false. eval.num_beams given with another value
is a config error, as is combining OPERA with VCD. OPERA is deterministic: no seed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from minigpt4.common.config import ConfigError
from minigpt4.models.opera import OperaDecoding
from minigpt4.models.opera_decoding import generate_opera

SOURCE = ("shikiw/OPERA: transformers-4.29.2/src/transformers/generation/utils.py (opera_beam_search, generate), "
          "minigpt4/models/mini_gpt4.py and minigpt4/models/llava.py (key_position), chair_eval.py, pope_eval.py, "
          "README.md")
# eval.opera.setting -> (threshold, num_attn_candidates) when those keys are null
SETTINGS = {"default": (15, 5), "fast": (25, 1)}
# label name of each parameter, in the order of OperaDecoding
LABEL_NAMES = {"num_beams": "beams", "scale_factor": "scale", "threshold": "threshold",
               "num_attn_candidates": "candidates", "penalty_weights": "penalty", "window_size": "window"}


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_opera(ev) -> None:
    """Every eval.opera key, whatever the decoding (a bad value is refused, not kept for later); ConfigError
    naming the key."""
    opera = ev.opera
    checks = [
        ("setting", opera.setting, opera.setting in SETTINGS, f"one of {', '.join(SETTINGS)} (threshold and "
                                                              f"candidates: {SETTINGS})"),
        ("num_beams", opera.num_beams, _integer(opera.num_beams, 2),
         "an integer >= 2 (OPERA is a beam search; the source refuses 1 beam)"),
        ("scale_factor", opera.scale_factor, math.isfinite(opera.scale_factor) and opera.scale_factor > 0,
         "a finite number > 0"),
        ("threshold", opera.threshold, opera.threshold is None or _integer(opera.threshold, 0),
         "an integer >= 0, or null for the setting's"),
        ("num_attn_candidates", opera.num_attn_candidates,
         opera.num_attn_candidates is None or _integer(opera.num_attn_candidates, 1),
         "an integer >= 1, or null for the setting's"),
        ("penalty_weights", opera.penalty_weights, math.isfinite(opera.penalty_weights) and opera.penalty_weights >= 0,
         "a finite number >= 0 (0: no penalty)"),
        ("window_size", opera.window_size, _integer(opera.window_size, 1), "an integer >= 1"),
    ]
    for key, value, good, expected in checks:
        if not good:
            raise ConfigError(f"eval.opera.{key} = {value!r}; expected {expected}")


def resolve_opera(ev) -> OperaDecoding:
    """The OPERA parameters of the `eval:` section (checked)."""
    check_opera(ev)
    opera = ev.opera
    threshold, candidates = SETTINGS[opera.setting]
    return OperaDecoding(num_beams=int(opera.num_beams), scale_factor=float(opera.scale_factor),
                         threshold=int(threshold if opera.threshold is None else opera.threshold),
                         num_attn_candidates=int(candidates if opera.num_attn_candidates is None
                                                 else opera.num_attn_candidates),
                         penalty_weights=float(opera.penalty_weights), window_size=int(opera.window_size))


def opera_label(decoding: OperaDecoding) -> str:
    """opera(beams=5,scale=50,threshold=15,candidates=5,penalty=1,window=512): every parameter."""
    parts = [f"{LABEL_NAMES[key]}={value:g}" for key, value in dataclasses.asdict(decoding).items()]
    return f"opera({','.join(parts)})"


def opera_record(decoding: OperaDecoding) -> dict[str, Any]:
    """For metrics.json: every parameter under its eval.opera name, and the source."""
    return {"name": "opera", **dataclasses.asdict(decoding), "source": SOURCE}


def opera_protocol(used, decoding: OperaDecoding, given: dict[str, Any]):
    """The protocol record a task runs with under OPERA: OPERA's beams, and hypotheses ending at EOS or the token
    limit (module docstring). `given`: the protocol keys the config sets; eval.num_beams must agree."""
    beams = given.get("eval.num_beams")
    if beams is not None and beams != decoding.num_beams:
        raise ConfigError(f"eval.num_beams = {beams} but eval.opera.num_beams = {decoding.num_beams}: under "
                          "eval.decoding = opera the beams are eval.opera.num_beams; drop eval.num_beams or make "
                          "them agree")
    return dataclasses.replace(used, num_beams=decoding.num_beams, stop_at_end_string=False)


def generate_with_opera(model, prompts: list[str], images: torch.Tensor, decoding: OperaDecoding, *,
                        image_features: bool, max_new_tokens: int, num_beams: int | None = None,
                        min_new_tokens: int = 0, stop_strings: list[str] | None = None) -> list[str]:
    """OPERA's answers to one batch, from preprocessed pixels or, with `image_features`, cached encoder outputs.
    The protocol's generation settings must be OPERA's (opera_protocol): another beam count or a stop string is
    refused, not ignored."""
    if num_beams is not None and num_beams != decoding.num_beams:
        raise ValueError(f"OPERA searches with {decoding.num_beams} beams (eval.opera.num_beams); "
                         f"num_beams = {num_beams} cannot be honoured")
    if stop_strings != []:
        raise ValueError("OPERA's hypotheses end at EOS or the token limit, as the source's; pass "
                         f"stop_strings=[] (got {stop_strings!r})")
    features = images.to(model.device) if image_features else model.encode_images(images)
    return generate_opera(model, prompts, features, decoding, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens)
