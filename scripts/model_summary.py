#!/usr/bin/env python
"""Parameter counts per component, as JSON, without weights or memory:

    python scripts/model_summary.py --cfg-path train_configs/adavib_minigpt4_7b.yaml --device meta

Weight paths in the config are ignored on the meta device (only shapes are built), so this runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import sys

from minigpt4.common.config import ConfigError, ModelConfig, load_yaml, merge, validate_model_config
from minigpt4.models.from_config import build_model


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def summarize(model) -> dict:
    """Counts for MiniGPT-4 (vision, ln_vision, qformer, query_tokens) or LLaVA (vision tower) + projector, llm."""
    parts: dict[str, int] = {}
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "qformer"):
        parts["vision"] = count(encoder.vision_model)
        parts["ln_vision"] = count(encoder.ln_vision)
        parts["qformer"] = count(encoder.qformer)
        parts["query_tokens"] = encoder.query_tokens.numel()
    elif encoder is not None:
        parts["vision"] = count(encoder)
    parts["projector"] = count(model.projector)
    parts["projector_trainable"] = sum(p.numel() for p in model.projector.parameters() if p.requires_grad)
    parts["llm"] = count(model.llm)
    parts["llm_trainable"] = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    parts["total"] = count(model)
    parts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", required=True, help="a train or eval YAML with a `model:` section")
    ap.add_argument("--device", default="meta", help="meta (default: shapes only) or cpu/cuda to build for real")
    ap.add_argument("--options", nargs="*", default=[], help="model.key=value overrides")
    args = ap.parse_args(argv)
    try:
        raw = load_yaml(args.cfg_path)  # duplicate keys, tabs, syntax errors: a ConfigError naming file:line
        model_options = [o.split("model.", 1)[1] for o in args.options if o.startswith("model.")]
        # On the meta device only shapes matter: weight paths left as ??? in a recipe may stay unset.
        cfg = merge(ModelConfig, raw.get("model", {}), options=model_options, where=f"{args.cfg_path}: model",
                    allow_missing=args.device == "meta")
        validate_model_config(cfg, check_files=args.device != "meta")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    model = build_model(cfg, device=args.device)
    out = {"config": args.cfg_path, "arch": cfg.arch, "projector_type": cfg.mm_projector_type,
           "params": summarize(model)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
