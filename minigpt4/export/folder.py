"""Reading an export folder that may be damaged or hostile (--check, --to-trainable): adavib_export.json and
config.json through the project's JSON reader (file:line:column errors), every safetensors file's header before a
tensor is read (a truncated file says so), the MiniGPT-4 .pth with tensor-only unpickling (a pickle that would run
code is refused, never executed). Every problem is an ExportError / CheckpointError / DataFileError naming the file:
one line and exit status 2."""
from __future__ import annotations

from pathlib import Path

import torch

from minigpt4.common.jsonfiles import read_json
from minigpt4.export.hf_parts import MANIFEST_FILE
from minigpt4.export.source import ExportError, state_keys
from minigpt4.models.checkpoints import load_state_file

INDEX_FILE = "model.safetensors.index.json"


def json_object(path: Path, what: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def read_manifest(folder: Path, *, required: bool) -> dict:
    """adavib_export.json, with the keys the readers use checked ({} when absent and not required)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise ExportError(f"{folder}: no {MANIFEST_FILE}; not a folder written by this exporter")
        return {}
    manifest = json_object(path, "the manifest the exporter writes")
    if "formats" in manifest and not isinstance(manifest["formats"], dict):
        raise ExportError(f"{path}: formats: expected a mapping of format name -> record, got "
                          f"{type(manifest['formats']).__name__}")
    if required and "formats" not in manifest:
        raise ExportError(f"{path}: has no 'formats' (which formats the export holds)")
    if manifest.get("stop") is not None and not isinstance(manifest["stop"], str):
        raise ExportError(f"{path}: stop: expected a string (the stop text), got {type(manifest['stop']).__name__}")
    return manifest


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a transformers folder (the shards the index names, else model.safetensors)."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return ["model.safetensors"]
    weight_map = json_object(index, "a safetensors shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ExportError(f"{index}: weight_map: expected a mapping of tensor name -> shard file")
    return sorted(set(weight_map.values()))


def check_weight_files(folder: Path) -> None:
    """Every weight file of the folder is there and complete (its header read, its size checked against it)."""
    for name in weight_files(folder):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise ExportError(f"{folder}: weight file {name} is missing")
        state_keys(str(path))  # CheckpointError naming the file when truncated or not safetensors


def read_projector_pth(path: Path) -> dict[str, torch.Tensor]:
    """minigpt4_projector.pth's {llama_proj.weight, llama_proj.bias}, tensor-only unpickling."""
    return load_state_file(path, check_values=False)
