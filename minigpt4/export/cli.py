"""The exporter's command line: `python -m minigpt4.export`, `python scripts/export_hf.py`, `adavib-export`.

    ... --cfg-path CONFIG [--options model.key=value ...] [--ckpt trainable.safetensors] --out DIR
        [--format blip2-hf minigpt4-pth | llava-hf] [--dtype auto|fp32|fp16|bf16] [--metrics metrics.json]
        [--train-config run/config.json] [--no-hash]
    ... --check DIR                                   reload with transformers' classes, report
    ... --to-trainable DIR --out trainable.safetensors     μ (from the export) + σ head and prior (side file)

Bad input (config keys, missing files, a checkpoint that does not fit, a format that cannot hold the model) is one
line `error: ...` and exit status 2. The export is written into a temporary folder next to DIR and renamed into
place when complete, so a failed export never leaves a half-written DIR.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from minigpt4.export import hf_parts
from minigpt4.export.source import ExportError, ExportSource

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="adavib-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", help="train or eval YAML; its model: section is read")
    ap.add_argument("--options", nargs="*", default=[], help="model overrides, e.g. model.llm_path=weights/vicuna")
    ap.add_argument("--ckpt", help="this project's trainable.safetensors (sets model.ckpt)")
    ap.add_argument("--out", help="export folder (must not exist or be empty); with --to-trainable: the file")
    ap.add_argument("--format", nargs="+", help="default: every format the architecture has "
                    "(minigpt4: blip2-hf minigpt4-pth; llava15: llava-hf)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *hf_parts.DTYPES],
                    help="dtype of the exported weights (auto: the LLM's, i.e. model.llm_dtype)")
    ap.add_argument("--metrics", help="evaluate.py's metrics.json: results and protocol go into the model card")
    ap.add_argument("--train-config", help="resolved training config (default: config.json next to --ckpt)")
    ap.add_argument("--no-hash", action="store_true", help="do not SHA-256 the base weights for the card")
    ap.add_argument("--check", metavar="DIR", help="reload DIR with transformers and report what it holds")
    ap.add_argument("--to-trainable", metavar="DIR", help="rebuild trainable.safetensors from export DIR")
    args = ap.parse_args(argv)
    modes = [m for m in ("check", "to_trainable") if getattr(args, m)]
    if len(modes) > 1 or (modes and args.cfg_path):
        ap.error("use one of: --cfg-path ... --out DIR (export), --check DIR, --to-trainable DIR --out FILE")
    if not modes and not (args.cfg_path and args.out):
        ap.error("an export needs --cfg-path and --out")
    if args.to_trainable and not args.out:
        ap.error("--to-trainable needs --out FILE")
    return args


def _records(cfg, hash_files: bool) -> dict:
    from minigpt4.common.config import PATH_KEYS
    from minigpt4.common.provenance import HashCache, file_record

    cache = HashCache() if hash_files else None
    sources = {}
    for key in PATH_KEYS:
        if cfg.get(key) is not None:
            path = str(cfg[key])
            sources[f"model.{key}"] = (file_record(path, cache) if cache else
                                       {"path": str(Path(path).resolve()), "kind": "not hashed (--no-hash)"})
    return sources


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


def export(source: ExportSource, formats: tuple[str, ...], out: Path, *, dtype_name: str = "auto",
           metrics: str | None = None, hash_files: bool = True) -> dict:
    """Write every requested format, the VIB side file, adavib_export.json and README.md into `out`."""
    from minigpt4.export.card import projector_summary, write_model_card

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        notes: list[str] = []
        dtype = hf_parts.export_dtype(dtype_name, source.model)
        written = _write_formats(source, formats, staging, dtype, notes)
        projector = projector_summary(source.cfg, source.train_config)
        mean_head = "language_projection" if "blip2-hf" in written else (
            "multi_modal_projector" if "llava-hf" in written else "llama_proj (minigpt4_projector.pth)")
        vib_head = hf_parts.write_vib_head(staging, source.model.projector, projector["vib"] or {}, mean_head)
        manifest = {"arch": source.cfg.arch, "projector": projector, "dtype": str(dtype).replace("torch.", ""),
                    "formats": written, "vib_head": vib_head, "stop": source.model.end_sym,
                    "sources": _records(source.cfg, hash_files), "training_config": source.train_config_path,
                    "metrics": metrics, "config": source.cfg_path, "notes": notes}
        manifest["files"] = {p.name: FILE_ROLES.get(p.name, "") for p in sorted(staging.iterdir())}
        manifest["files"]["README.md"] = FILE_ROLES["README.md"]
        manifest["files"][hf_parts.MANIFEST_FILE] = FILE_ROLES[hf_parts.MANIFEST_FILE]
        (staging / hf_parts.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        write_model_card(staging, source, manifest, metrics)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def to_trainable(folder: Path, out_file: Path) -> list[str]:
    """This project's trainable.safetensors from an export: μ from its weights, σ head and prior from the side
    file."""
    from minigpt4.export.reassemble import trainable_from_export
    from minigpt4.models.checkpoints import save_trainable

    tensors = trainable_from_export(folder)
    save_trainable(out_file, tensors, {"source": f"exported folder {folder}"})
    return sorted(tensors)


def _run(args: argparse.Namespace) -> int:
    if args.check:
        from minigpt4.export.check import check_export, format_report

        print(format_report(check_export(args.check)))
        return 0
    if args.to_trainable:
        keys = to_trainable(Path(args.to_trainable), Path(args.out))
        print(f"wrote {args.out}: {', '.join(keys)}")
        return 0
    if args.metrics:
        from minigpt4.eval.results_table import load_metrics

        if not os.path.isfile(args.metrics):
            raise ExportError(f"--metrics: file not found: {args.metrics}")
        try:  # checked before the (long) model build
            load_metrics(args.metrics)
        except (ValueError, UnicodeDecodeError) as err:
            raise ExportError(f"--metrics: {err}") from None
    from minigpt4.export.source import load_source

    source, formats = load_source(args.cfg_path, args.options, args.ckpt, args.format, args.train_config)
    manifest = export(source, formats, Path(args.out), dtype_name=args.dtype, metrics=args.metrics,
                      hash_files=not args.no_hash)
    print(f"exported {', '.join(manifest['formats'])} to {args.out} ({len(manifest['files'])} files)")
    for name, info in manifest["formats"].items():
        for diff in info.get("differences", []):
            if diff["exact"] is False:
                print(f"  differs ({name}, {diff['what']}): {diff['detail']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from minigpt4.common.errors import USER_FACING_ERRORS

    try:
        return _run(args)
    except (ExportError, *USER_FACING_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
