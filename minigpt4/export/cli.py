"""The exporter's command line: `python -m minigpt4.export`, `python scripts/export_hf.py`, `adavib-export`.

    ... --cfg-path CONFIG [--options model.key=value ...] [--ckpt trainable.safetensors] --out DIR
        [--format blip2-hf minigpt4-pth | llava-hf] [--dtype auto|fp32|fp16|bf16] [--metrics metrics.json]
        [--train-config run/config.json] [--no-hash] [--record-full-paths]
    ... --check DIR                                   reload with transformers' classes, report
    ... --to-trainable DIR --out trainable.safetensors     μ (from the export) + σ head and prior (side file)

Bad input (config keys, missing files, a checkpoint that does not fit, a format that cannot hold the model, a
metrics.json of other weights or with a wrong value, a damaged export folder, a full disk) is one line `error: ...`
and exit status 2. The export is written into a hidden staging folder next to DIR and renamed into place when
complete (staging.py): an error, Ctrl-C or SIGTERM removes it (SIGTERM: one line, exit status 143), and the next
export into the same parent folder removes those that SIGKILL left. The card and adavib_export.json name the files
they were made from by name and SHA-256; --record-full-paths adds their absolute paths.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from minigpt4.export import hf_parts
from minigpt4.export.source import ExportError
from minigpt4.export.staging import ExportStopped


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
    ap.add_argument("--metrics", help="evaluate.py's metrics.json of these weights (checked by their SHA-256 before "
                    "the export): results and protocol go into the model card")
    ap.add_argument("--train-config", help="resolved training config (default: config.json next to --ckpt)")
    ap.add_argument("--no-hash", action="store_true", help="do not SHA-256 the base weights for the card (not "
                    "with --metrics, whose weights are checked by their SHA-256)")
    ap.add_argument("--record-full-paths", action="store_true", help="record the absolute paths of the source files "
                    "in the card and adavib_export.json (default: file names and SHA-256 only, publishable)")
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
    if args.no_hash and args.metrics:
        ap.error("--metrics is checked against the SHA-256 of the exported weights; drop --no-hash")
    return args


def to_trainable(folder: Path, out_file: Path) -> list[str]:
    """This project's trainable.safetensors from an export: μ from its weights, σ head and prior from the side
    file."""
    from minigpt4.export.reassemble import trainable_from_export
    from minigpt4.models.checkpoints import save_trainable

    tensors = trainable_from_export(folder)
    save_trainable(out_file, tensors, {"source": f"exported folder {folder.name}"})
    return sorted(tensors)


def run_export(args: argparse.Namespace) -> dict:
    """The export command: the metrics are read and checked first, then the config, then (before the model is
    built) the metrics' weights against the exported ones; then build and write."""
    from minigpt4.export.metrics_check import read_metrics, verify_metrics_weights
    from minigpt4.export.records import source_records
    from minigpt4.export.source import build_source, plan_export
    from minigpt4.export.writer import ExportRecords, check_out_folder, export

    metrics = read_metrics(args.metrics) if args.metrics else None
    out = Path(args.out)
    plan = plan_export(args.cfg_path, args.options, args.ckpt, args.format, args.train_config)
    check_out_folder(out)
    sources = source_records(plan.cfg, hash_files=not args.no_hash, full_paths=args.record_full_paths)
    records = ExportRecords(sources, args.metrics, full_paths=args.record_full_paths)
    if metrics is not None:
        records.metrics_checked_against = verify_metrics_weights(args.metrics, metrics, sources)
    source = build_source(plan)
    return export(source, plan.formats, out, records, dtype_name=args.dtype)


def _run(args: argparse.Namespace) -> int:
    if args.check:
        from minigpt4.export.check import check_export, format_report

        print(format_report(check_export(args.check)))
        return 0
    if args.to_trainable:
        keys = to_trainable(Path(args.to_trainable), Path(args.out))
        print(f"wrote {args.out}: {', '.join(keys)}")
        return 0
    manifest = run_export(args)
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
    from minigpt4.common.signals import sigterm_handled

    stopping: list[int] = []

    def stop(signum: int, frame) -> None:  # once: a second SIGTERM must not cut the clean-up short
        if not stopping:
            stopping.append(signum)
            raise ExportStopped()

    try:
        with sigterm_handled(stop):
            return _run(args)
    except (ExportError, *USER_FACING_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportStopped:
        unwritten = f"; nothing was written to {args.out}" if args.out else ""
        print(f"stopped by SIGTERM{unwritten} (an export's staging folder is removed)", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
