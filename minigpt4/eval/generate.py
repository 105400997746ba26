"""Batched, sharded, resumable generation for the benchmarks.

Predictions are appended to a JSONL file per rank as they are produced (flushed and fsynced per batch); a
rerun reads every part file, skips what is done and generates only the rest, so a killed evaluation loses
at most the batch in flight and never duplicates an item. Rank 0 merges the parts at the end. A run never
removes a stored answer: answers to items it did not ask (a smaller image list, fewer questions) stay in the
file after the ones asked, and only the ones asked are returned (and scored). A full disk is reported as such,
naming the file and the bytes it needed (OutputDirError); what was written before stays and a rerun resumes.

A stored answer is reused only for the same question: its line keeps the prompt and the item's fields (image,
question id, the image file's SHA-256), and a key whose stored prompt or fields differ from the item now asked is
refused (`check_done_items`), never silently answered by the old line: a question file edited under the same id,
or an image replaced under the same name. What the key and prompt cannot show (the weights, the generation
settings) is checked against the fingerprint next to the answers (minigpt4/eval/fingerprint.py) before the model
is built.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm import tqdm

from minigpt4.common import dist
from minigpt4.common.config import ConfigError
from minigpt4.common.jsonfiles import DataFileError, decode_utf8, parse_jsonl
from minigpt4.common.output_dir import OutputDirError, free_bytes, human_bytes, is_space_problem, storage_reason
from minigpt4.eval.answer_files import IMAGE_HASH
from minigpt4.eval.decodings import Decoding, generate_answers

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
    decoding: Optional[Decoding] = None,
    image_features: bool = False,
    clean_answer: Callable[[str], str] | None = None,
    desc: str = "generate",
) -> dict[str, dict]:
    """Generate an answer for every item not yet in `out_path` and return the predictions of `items` by key (on
    every rank; stored answers to other items stay in the file). `load_image(path)` returns the image's input
    (preprocessed (3, H, W) pixels; with `image_features` its cached encoder outputs; under VCD the pair of
    vcd.ImagePairs), or None to skip a bad image (counted). Each batch is answered by
    decodings.generate_answers(model, ..., decoding=decoding, **generate_kwargs); `clean_answer` (the protocol
    run's post-processing) is applied to each answer before it is stored."""
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
    part = part_path(out_path, rank)
    with _open_for_append(part) as out, tqdm(total=len(mine), desc=desc, disable=rank != 0 or not mine) as bar:
        for batch in _batches(mine, batch_size):
            loaded = [(it, load_image(it.image)) for it in batch]
            good = [(it, img) for it, img in loaded if img is not None]
            skipped += len(loaded) - len(good)
            if good:
                images = torch.stack([img for _, img in good])
                answers = generate_answers(model, [it.prompt for it, _ in good], images, decoding=decoding,
                                           image_features=image_features, item_keys=[it.key for it, _ in good],
                                           **(generate_kwargs or {}))
                if clean_answer is not None:
                    answers = [clean_answer(answer) for answer in answers]
                lines = "".join(json.dumps({"key": it.key, **it.extra, "prompt": it.prompt, "answer": answer}) + "\n"
                                for (it, _), answer in zip(good, answers))
                data = lines.encode("utf-8")
                with reported_as_full_disk(part, len(data), f"cannot append {len(good)} answer(s) to"):
                    append_answers(out, data)
            bar.update(len(batch))
    if skipped:
        log.warning("rank %d: skipped %d items with unreadable images", rank, skipped)
    dist.barrier()
    if rank == 0:
        merge_parts(out_path, keys)
    dist.barrier()
    done = completed(out_path)
    return {key: done[key] for key in keys if key in done}


def _open_for_append(path: str):
    """The part file, unbuffered: a failed write must not leave bytes in a buffer that closing would retry."""
    with reported_as_full_disk(path, 0, "cannot open"):
        return open(path, "ab", buffering=0)


def append_answers(handle, data: bytes) -> None:
    """One batch of answer lines onto the open part file, then fsync: on disk before the next batch starts."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]
    os.fsync(handle.fileno())


@contextlib.contextmanager
def reported_as_full_disk(path: str, needed: int, doing: str):
    """A full, read-only or over-quota disk under `path` becomes one OutputDirError naming the file, the bytes
    `needed` and the free space; any other OSError is left as it is (not the user's to fix)."""
    try:
        yield
    except OSError as err:
        reason = storage_reason(err, path, needed)
        if reason is None:
            raise
        free = free_bytes(path)
        space = (f"; it needs about {human_bytes(needed)} ({human_bytes(free)} free there)"
                 if is_space_problem(reason) and free is not None and needed else "")
        fix = "free space there" if is_space_problem(reason) else "make it writable"
        raise OutputDirError(f"{doing} {path}: {reason}{space}; the answers written before are kept: {fix} and run "
                             "the same command again to resume") from None


def stored_elsewhere(out_path: str, items: list[GenerationItem]) -> int:
    """How many answers stored in `out_path` belong to no item of `items` (kept, not part of this run)."""
    asked = {it.key for it in items}
    return sum(key not in asked for key in completed(out_path))


def check_prompt_lengths(model, items: list[GenerationItem], max_new_tokens: int, key: str, where: str) -> None:
    """Refuse (ConfigError) an item whose whole sequence cannot have a position in the LLM: its prompt tokens (BOS,
    text and the visual tokens, as the model embeds them) plus the `max_new_tokens` (config `key`) an answer may
    take. Every generated token is fed back at the next position, so the answer's tokens need positions as the
    prompt's do; past max_position_embeddings the output no longer means anything, and no error would say so."""
    limit = getattr(getattr(getattr(model, "llm", None), "config", None), "max_position_embeddings", None)
    if not limit:
        return
    lengths: dict[str, int] = {}
    for item in items:
        if item.prompt not in lengths:  # POPE asks the same few questions of every image
            before, after = model.prompt_tokenizer.prompt_ids(item.prompt)
            lengths[item.prompt] = len(before) + model.num_query_tokens + len(after)
        if lengths[item.prompt] + max_new_tokens > limit:
            named = ", ".join(f"{name} {value!r}" for name, value in item.extra.items() if name != IMAGE_HASH)
            raise ConfigError(
                f"{where}: {named or f'key {item.key!r}'}: the prompt is {lengths[item.prompt]} tokens (with "
                f"{model.num_query_tokens} visual tokens) + {key} = {max_new_tokens} = "
                f"{lengths[item.prompt] + max_new_tokens} positions, more than the LLM's max_position_embeddings = "
                f"{limit}; shorten the question or lower {key}")


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
            why = "another question file or prompt"
            if name == IMAGE_HASH:  # an image replaced (or removed) under the same name since its answer
                why = (f"the image file {item.image} was replaced" if row.get(name) is not None else
                       "the stored answer records no image hash: it is from before image hashes were recorded")
            raise ResumeMismatchError(
                f"{out_path}: the stored answer for key {item.key!r} was made for another {name} "
                f"({describe_change(row.get(name), wanted[name])}: {why}); to start "
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
    """Write every prediction once to out_path (atomically), those of `order` first and in its order, then the
    stored ones of other items as they were; remove the part files. Nothing stored is dropped."""
    done = completed(out_path)
    first = [key for key in order if key in done]
    asked = set(first)
    keys = first + [key for key in done if key not in asked]
    data = "".join(json.dumps(done[key]) + "\n" for key in keys).encode("utf-8")
    tmp = out_path + ".tmp"
    try:
        with reported_as_full_disk(tmp, len(data), "cannot write the merged answers file"), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):  # the part files still hold every answer: a rerun merges them again
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    folder = os.path.dirname(out_path) or "."
    base = os.path.basename(out_path) + ".part"
    for name in os.listdir(folder):
        if name.startswith(base) and name[len(base):].isdigit():
            os.remove(os.path.join(folder, name))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
