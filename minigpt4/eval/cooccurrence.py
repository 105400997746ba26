"""Co-occurrence hallucination on the shapes world: how often a model names or affirms the absent partner of a
present anchor (moon without star, house without tree, arrow without ring).

Read from an `evaluate.py` output folder of a shapes world: CHAIR's per-caption rows (chair.json) and the POPE
answers pope.json points to. A "trap" is a val image holding an anchor without its partner.
"""
from __future__ import annotations

import json
from pathlib import Path

from minigpt4.eval.paired import image_key
from minigpt4.eval.pope import answered_questions


def world_pairs(world: str | Path) -> list[tuple[str, str]]:
    """(anchor, partner) pairs of a shapes-world folder, from its meta.json."""
    meta = json.loads((Path(world) / "meta.json").read_text())
    return [(anchor, partner) for anchor, partner in meta["cooccurrence_pairs"]]


def partner_traps(eval_dir: str | Path, pairs: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{partner: counts} with caption_traps / caption_named (captions of trap images naming the partner) and
    pope_questions / pope_yes ("no" questions about the absent partner of a trap image, each image and class
    once over all splits, and those answered "yes")."""
    eval_dir = Path(eval_dir)
    rows = json.loads((eval_dir / "chair.json").read_text())["per_caption"]
    counts = {partner: {"caption_traps": 0, "caption_named": 0, "pope_questions": 0, "pope_yes": 0}
              for _, partner in pairs}
    for row in rows:
        truth = set(row["ground_truth"])
        for anchor, partner in pairs:
            if anchor in truth and partner not in truth:
                counts[partner]["caption_traps"] += 1
                counts[partner]["caption_named"] += partner in row["mentions"]
    truth_by_image = {image_key(row["image_id"]): set(row["ground_truth"]) for row in rows}
    pope = json.loads((eval_dir / "pope.json").read_text())
    said_yes: dict[tuple[str, str], bool] = {}
    for _, question, predicted in answered_questions(pope):
        if question["label"] != "no":
            continue
        truth = truth_by_image.get(image_key(question["image"]), set())
        for anchor, partner in pairs:
            if anchor in truth and partner not in truth and f" {partner} " in question["text"]:
                key = (question["image"], partner)
                said_yes[key] = said_yes.get(key, False) or predicted == "yes"
    for (_, partner), yes in said_yes.items():
        counts[partner]["pope_questions"] += 1
        counts[partner]["pope_yes"] += yes
    return counts


def total(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """The per-partner counts summed."""
    keys = next(iter(counts.values())).keys()
    return {key: sum(c[key] for c in counts.values()) for key in keys}
