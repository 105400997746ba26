"""Writing an export: every requested format, the VIB side file, adavib_export.json and the model card, into a
staging folder that is renamed into --out when complete (staging.py: never left behind, space checked first)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from minigpt4.export import hf_parts
from minigpt4.export.records import named_file
from minigpt4.export.source import ExportError, ExportSource
from minigpt4.export.staging import check_space, staging_path, storage_error, sweep_stale_staging

log = logging.getLogger(__name__)

FILE_ROLES = {
    "config.json": "transformers model config", "generation_config.json": "greedy defaults, stop and suppressed ids",
    "model.safetensors": "weights (μ head as the projector)", "model.safetensors.index.json": "weight shard index",
    "processor_config.json": "processor settings", "preprocessor_config.json": "image processor settings",
    "chat_template.jinja": "chat template (this project's prompt template)", "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer settings", "special_tokens_map.json": "special tokens",
    "minigpt4_projector.pth": "original MiniGPT-4 projector {\"model\": {llama_proj.weight, llama_proj.bias}}",
    hf_parts.VIB_HEAD_FILE: "VIB σ head + prior (fp32), for continuing training",
    hf_parts.MANIFEST_FILE: "sources with SHA-256, differences, prompt check", "README.md": "this model card",
}
SIZE_ALLOWANCE = 16 << 20  # tokenizer, configs, card: a few MB at most


@dataclass
class ExportRecords:
    """What the export says about its inputs (records.py): weight sources, the metrics given and whether their
    weights were checked, and whether absolute paths are recorded."""

    sources: dict
    metrics_path: str | None = None
    metrics_checked_against: str | None = None  # the file whose weight record matched this export's
    full_paths: bool = False


def export_size(model, formats: tuple[str, ...], dtype) -> int:
    """About how many bytes the export needs: the model's tensors in `dtype` for a Hugging Face folder, the
    projector in fp32 for the .pth and the VIB side file, and an allowance for the small files."""
    hf = any(name != "minigpt4-pth" for name in formats)
    whole = sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize if hf else 0
    projector = sum(t.numel() for t in model.projector.state_dict().values()) * 4
    return whole + 2 * projector + SIZE_ALLOWANCE


def _write_formats(source: ExportSource, formats: tuple[str, ...], out: Path, dtype, notes: list[str]) -> dict:
    from minigpt4.export import blip2_hf, llava_hf

    written = {}
    for name in formats:
        if name == "minigpt4-pth":
            blip2_hf.write_projector_pth(source, out)
            written[name] = {"format": name, "file": blip2_hf.PROJECTOR_FILE, "differences": []}
        elif name == "blip2-hf":
            written[name] = blip2_hf.write_blip2_folder(source, out, dtype, notes)
        else:
            written[name] = llava_hf.write_llava_folder(source, out, dtype, notes)
    hf = [n for n in written if n != "minigpt4-pth"]
    if hf:
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(out, local_files_only=True, backend="pil")
        size = processor.image_processor.size
        side = size.get("height") or size.get("shortest_edge")
        check = hf_parts.prompt_token_check(source.model, processor, Image.new("RGB", (side, side), (128, 128, 128)))
        written[hf[0]]["prompt_check"] = check
        if not check["equal"]:
            log.warning("the exported chat template + tokenizer do not give this project's prompt ids (first "
                        "difference at token %s); see the model card", check["first_difference"])
    return written


def _write_everything(source: ExportSource, formats: tuple[str, ...], staging: Path, dtype,
                      records: ExportRecords) -> dict:
    from minigpt4.export.card import projector_summary, write_model_card

    notes: list[str] = []
    written = _write_formats(source, formats, staging, dtype, notes)
    projector = projector_summary(source.cfg, source.train_config)
    mean_head = "language_projection" if "blip2-hf" in written else (
        "multi_modal_projector" if "llava-hf" in written else "llama_proj (minigpt4_projector.pth)")
    vib_head = hf_parts.write_vib_head(staging, source.model.projector, projector["vib"] or {}, mean_head)
    full = records.full_paths
    metrics = named_file(records.metrics_path, full_paths=full)
    if metrics is not None:
        metrics["weights_checked_against"] = (Path(records.metrics_checked_against).name
                                              if records.metrics_checked_against else None)
    manifest = {"arch": source.cfg.arch, "projector": projector, "dtype": str(dtype).replace("torch.", ""),
                "formats": written, "vib_head": vib_head, "stop": source.model.end_sym, "sources": records.sources,
                "training_config": named_file(source.train_config_path, full_paths=full), "metrics": metrics,
                "config": named_file(source.cfg_path, full_paths=full), "full_paths": full, "notes": notes}
    manifest["files"] = {p.name: FILE_ROLES.get(p.name, "") for p in sorted(staging.iterdir())}
    manifest["files"]["README.md"] = FILE_ROLES["README.md"]
    manifest["files"][hf_parts.MANIFEST_FILE] = FILE_ROLES[hf_parts.MANIFEST_FILE]
    (staging / hf_parts.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    write_model_card(staging, source, manifest, records.metrics_path)
    return manifest


def check_out_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")


def export(source: ExportSource, formats: tuple[str, ...], out: Path, records: ExportRecords, *,
           dtype_name: str = "auto") -> dict:
    """Write every requested format, the VIB side file, adavib_export.json and README.md into `out`."""
    check_out_folder(out)
    sweep_stale_staging(out.parent)  # what killed exports left here, before the space is measured
    dtype = hf_parts.export_dtype(dtype_name, source.model)
    needed = export_size(source.model, formats, dtype)
    check_space(out, needed)
    staging = staging_path(out)
    try:
        shutil.rmtree(staging, ignore_errors=True)  # a folder of an earlier process with this pid
        staging.mkdir(parents=True)
        log.info("writing the export into %s (renamed to %s when complete)", staging, out)
        manifest = _write_everything(source, formats, staging, dtype, records)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    except ExportError:
        raise
    except Exception as err:  # the disk's fault is the user's to fix: one line; anything else keeps its traceback
        storage = storage_error(err, out, staging, needed)
        if storage is None:
            raise
        raise storage from None
    finally:  # also on SIGTERM (staging.ExportStopped) and Ctrl-C
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
