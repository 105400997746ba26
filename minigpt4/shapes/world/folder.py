"""A shapes-world folder is reused only when it holds the world asked for (scripts/shapes_experiment.py): its
meta.json must record the same build parameters, else the folder is refused, naming each difference."""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

from minigpt4.shapes.world.scenes import build_shapes_world


def ensure_shapes_world(world: Path, val_cooccurrence: float | None, world_args: dict) -> None:
    """Build the world in `world` (build_shapes_world's defaults, then `world_args`, and `val_cooccurrence`; None:
    the training co-occurrence) unless it is there already; RuntimeError if another world is there."""
    meta = world / "meta.json"
    if meta.is_file():
        params = json.loads(meta.read_text())["params"]
        defaults = {name: p.default for name, p in inspect.signature(build_shapes_world).parameters.items()
                    if name in params} | world_args
        wanted = {**defaults, "val_cooccurrence": defaults["cooccurrence"] if val_cooccurrence is None
                  else val_cooccurrence}
        found = {**params, "val_cooccurrence": params.get("val_cooccurrence", params["cooccurrence"])}
        differ = ", ".join(f"{key}: {found.get(key)} instead of {value}" for key, value in wanted.items()
                           if found.get(key) != value)
        if differ:
            raise RuntimeError(f"{world} holds another shapes world ({differ}); move it away or pass --data")
        return
    start = time.perf_counter()
    build_shapes_world(world, val_cooccurrence=val_cooccurrence, **world_args)
    print(f"built the shapes world in {world} ({time.perf_counter() - start:.1f} s)")


def pope_folder(first: int | None) -> str:
    """The world's POPE folder: `pope`, or `pope_first{N}` holding the first N questions of each split."""
    return "pope" if first is None else f"pope_first{first}"


def first_pope_questions(world: Path, first: int) -> Path:
    """Write {world}/pope_first{N}/{split}.jsonl, the first N lines of each {world}/pope/{split}.jsonl (a POPE file
    lists each image's questions together, so these are all the questions of the first N/6 images when N is a
    multiple of 6). Rewritten each time: it is derived, so it can never hold another world's questions."""
    source, target = world / "pope", world / pope_folder(first)
    target.mkdir(exist_ok=True)
    for split in sorted(source.glob("*.jsonl")):
        lines = split.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) < first:
            raise RuntimeError(f"{split}: {len(lines)} questions, fewer than the {first} asked")
        tmp = target / f".{split.name}.tmp"
        tmp.write_text("".join(lines[:first]), encoding="utf-8")
        tmp.replace(target / split.name)
    return target
