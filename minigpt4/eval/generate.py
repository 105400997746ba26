"""Batched, sharded, resumable generation for the benchmarks.

Predictions are appended to a JSONL file per rank as they are produced (flushed and fsynced per batch); a
rerun reads every part file, skips what is done and generates only the rest, so a killed evaluation loses
at most the batch in flight and never duplicates an item. Rank 0 merges the parts at the end.

A stored answer is reused only for the same question: its line keeps the prompt and the item's fields (image,
question id), and a key whose stored prompt or fields differ from the item now asked is refused
(`check_done_items`), never silently answered by the old line. What the key and prompt cannot show (the
weights, the generation settings) is checked against the fingerprint next to the answers
(minigpt4/eval/fingerprint.py) before the model is built.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from minigpt4.common import dist
from minigpt4.common.config import ConfigError
from minigpt4.common.jsonfiles import DataFileError, decode_utf8, parse_jsonl

log = logging.getLogger(__name__)


class ResumeMismatchError(ConfigError):
    """Answers already in the output folder were made by another model, settings or question."""


@dataclass
class GenerationItem:
    key: str  # unique id of the item (question_id, image id); also the resume key
    image: str  # path of the image file
    prompt: str  # full prompt with one <ImageHere>
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the prediction line


def read_predictions(path: str) -> dict[str, dict]:
    """Lines of a predictions file by key. A torn last line (the process died mid-write) is cut off the
    file so later appends start on a clean line; any other malformed line, a line without "key", or a key
    written twice (two evaluations appending to one output_dir at once) is an error naming the line."""
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    line_of: dict[str, int] = {}
    for number, row in parse_jsonl(decode_utf8(data, path), path):
        if not isinstance(row, dict) or "key" not in row:
            raise DataFileError(f"{path}:{number}: expected a JSON object with a 'key' (a prediction line)")
        key = str(row["key"])
        if key in line_of:
            raise DataFileError(f"{path}:{number}: key {row['key']!r} again (first on line {line_of[key]}); was the "
                                "same output_dir written by two evaluations at once? Remove the file to regenerate")
        line_of[key] = number
        done[key] = row
    return done


def part_path(out_path: str, rank: int) -> str:
    return f"{out_path}.part{rank}"


def completed(out_path: str) -> dict[str, dict]:
    """Everything already generated: the merged file plus every rank's part file (any world size)."""
    done = read_predictions(out_path)
    folder = os.path.dirname(out_path) or "."
    base = os.path.basename(out_path) + ".part"
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith(base) and name[len(base):].isdigit():
            done.update(read_predictions(os.path.join(folder, name)))
    return done


def generate_all(
    model,
    items: list[GenerationItem],
    *,
    out_path: str,
    load_image: Callable[[str], torch.Tensor | None],
    batch_size: int = 8,
    sort_by_length: bool = True,
    generate_kwargs: dict | None = None,
    desc: str = "generate",
) -> dict[str, dict]:
    """Generate an answer for every item not yet in `out_path` and return all predictions by key (on every
    rank). `load_image(path)` returns a preprocessed (3, H, W) tensor, or None to skip a bad image (counted)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("generation items must have unique keys")
    done = completed(out_path)
    check_done_items(done, items, out_path)
    todo = [it for it in items if it.key not in done]
    # Every rank must shard the same `todo`: without this barrier a rank that starts late would already see
    # the answers a faster rank appended, shard a shorter list, and leave items unanswered.
    dist.barrier()
    mine = todo[rank::world]
    if sort_by_length:  # batches of similar prompt length waste less compute on padding
        mine.sort(key=lambda it: len(model.tokenizer(it.prompt, add_special_tokens=False).input_ids))
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    skipped = 0
    with open(part_path(out_path, rank), "a", encoding="utf-8") as out, \
            tqdm(total=len(mine), desc=desc, disable=rank != 0 or not mine) as bar:
        for batch in _batches(mine, batch_size):
            loaded = [(it, load_image(it.image)) for it in batch]
            good = [(it, img) for it, img in loaded if img is not None]
            skipped += len(loaded) - len(good)
            if good:
                images = torch.stack([img for _, img in good])
                kwargs = dict(generate_kwargs or {})
                if getattr(model, "takes_item_keys", False):  # VCD: each row's sampling seed comes from its key
                    kwargs["item_keys"] = [it.key for it, _ in good]
                answers = model.generate([it.prompt for it, _ in good], images, **kwargs)
                for (it, _), answer in zip(good, answers):
                    out.write(json.dumps({"key": it.key, **it.extra, "prompt": it.prompt, "answer": answer}) + "\n")
                out.flush()
                os.fsync(out.fileno())
            bar.update(len(batch))
    if skipped:
        log.warning("rank %d: skipped %d items with unreadable images", rank, skipped)
    dist.barrier()
    if rank == 0:
        merge_parts(out_path, [it.key for it in items])
    dist.barrier()
    return completed(out_path)


def check_done_items(done: dict[str, dict], items: list[GenerationItem], out_path: str) -> None:
    """Every stored answer whose key an item asks for again was made for that item's prompt and fields."""
    for item in items:
        row = done.get(item.key)
        if row is None:
            continue
        wanted = {"prompt": item.prompt, **item.extra}
        differ = [name for name, value in wanted.items() if row.get(name) != value]
        if differ:
            name = differ[0]
            raise ResumeMismatchError(
                f"{out_path}: the stored answer for key {item.key!r} was made for another {name} "
                f"({describe_change(row.get(name), wanted[name])}: another question file or prompt); to start "
                f"fresh, set another eval.output_dir or delete {os.path.dirname(out_path) or '.'}")


def describe_change(old: Any, new: Any, width: int = 28) -> str:
    """"old -> new" for a message; long strings are cut to the part around their first difference."""
    if isinstance(old, str) and isinstance(new, str) and max(len(old), len(new)) > width:
        same = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        start = max(0, same - 8)
        cut = [("..." if start else "") + repr(text[start:start + width]) + ("..." if len(text) > start + width
                                                                             else "") for text in (old, new)]
        return f"{cut[0]} -> {cut[1]}"
    return f"{old!r} -> {new!r}"


def merge_parts(out_path: str, order: Iterable[str]) -> None:
    """Write every prediction once, in item order, to out_path (atomically) and remove the part files."""
    done = completed(out_path)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for key in order:
            if key in done:
                f.write(json.dumps(done[key]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    folder = os.path.dirname(out_path) or "."
    base = os.path.basename(out_path) + ".part"
    for name in os.listdir(folder):
        if name.startswith(base) and name[len(base):].isdigit():
            os.remove(os.path.join(folder, name))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
