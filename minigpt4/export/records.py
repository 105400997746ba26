"""What an export records about the files it was made from (adavib_export.json and the model card), in a form that
can be published: file names with their SHA-256, never the local folders they sit in (those name users and home
directories). `--record-full-paths` adds the absolute paths for a private record.

    sources = source_records(cfg, hash_files=True, full_paths=False)   # {model.<key>: {file, kind, sha256, ...}}
    named_file("run/final/config.json", full_paths=False)             # {file: "config.json", sha256: ...}
    without_local_paths(train_config)                                  # absolute paths in a config -> file names
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from minigpt4.common.files import sha256_file
from minigpt4.common.provenance import HashCache, file_record, without_folders


def weight_paths(cfg) -> dict[str, str]:
    """`model.<key>` -> path of every weight / tokenizer source the model config names: the same function that
    gives the keys evaluate.py records in metrics.json's "weights"."""
    from omegaconf import OmegaConf

    from minigpt4.models.loading import files_to_record

    return files_to_record(OmegaConf.to_container(cfg, resolve=True))


def source_records(cfg, *, hash_files: bool, full_paths: bool) -> dict[str, dict]:
    """The weight sources of an export: name, kind, size and SHA-256 (a folder: of every file in it)."""
    cache = HashCache() if hash_files else None
    records = {}
    for key, path in weight_paths(cfg).items():
        if cache is None:
            record = {"path": str(Path(path).resolve()), "kind": "not hashed (--no-hash)"}
        else:
            record = file_record(path, cache)
        records[key] = {"file": Path(path).name, **record} if full_paths else without_folders(record)
    if cache is not None:
        cache.save()
    return records


def named_file(path: str | os.PathLike | None, *, full_paths: bool) -> dict | None:
    """A file the export read (the config, the training config, the metrics): its name and SHA-256."""
    if path is None:
        return None
    record = {"file": Path(path).name, "sha256": sha256_file(path)}
    return {**record, "path": str(Path(path).resolve())} if full_paths else record


def shown_name(record: dict | None) -> str | None:
    """How the card names a recorded file: its path when recorded, else its name."""
    if record is None:
        return None
    return record.get("path") or record.get("file")


def is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "\\\\")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))


def without_local_paths(value: Any) -> Any:
    """`value` (a resolved config: dicts, lists, scalars) with every absolute path replaced by its last part, the
    file or folder name; relative paths stay as they are (they name nothing outside the project)."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and is_local_path(value):
        return Path(value.replace("\\", "/")).name or value
    return value
