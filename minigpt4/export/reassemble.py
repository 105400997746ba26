"""An export back to this project's trainable.safetensors: μ from the exported weights (language_projection,
multi_modal_projector or the MiniGPT-4 .pth), the σ head and prior from the VIB side file. Exact when the export
was written in fp32 (the default on the CPU); otherwise μ comes back in the export's precision, upcast to fp32."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from minigpt4.export import hf_parts
from minigpt4.export.folder import check_weight_files, read_manifest, read_projector_pth, weight_files
from minigpt4.export.source import ExportError
from minigpt4.models.released_weights import read_llava_projector


def _prefixed_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with `prefix` from the safetensors files of a transformers folder (each checked
    complete first)."""
    check_weight_files(folder)
    found = {}
    for name in weight_files(folder):
        with safe_open(str(folder / name), framework="pt", device="cpu") as handle:
            found.update({k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
    return found


def mean_head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """μ of an export, keyed as this project's `projector.llama_proj.*`."""
    formats = read_manifest(folder, required=True)["formats"]
    if "llava-hf" in formats:
        head = read_llava_projector(folder)
    elif "blip2-hf" in formats:
        head = _prefixed_tensors(folder, "language_projection.")
    else:
        head = read_projector_pth(folder / "minigpt4_projector.pth")
        head = {k[len("llama_proj."):]: v for k, v in head.items() if k.startswith("llama_proj.")}
    if not head:
        raise ExportError(f"{folder}: the exported weights hold no projector tensors")
    return {f"projector.llama_proj.{k}": v.float() for k, v in head.items()}


def trainable_from_export(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    tensors = mean_head_tensors(folder)
    if (folder / hf_parts.VIB_HEAD_FILE).is_file():
        tensors.update(hf_parts.read_vib_head(folder))
    return tensors
