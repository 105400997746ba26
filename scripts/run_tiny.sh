#!/usr/bin/env bash
# The main job on the embedded tiny default: set up from nothing, build the tiny data, train AdaVIB.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python scripts/prepare_tiny.py --out data/tiny
.venv/bin/python train.py --cfg-path train_configs/tiny_cpu.yaml "$@"
echo "outputs: out/tiny_cpu/ (metrics.jsonl, checkpoints/, final/trainable.safetensors)"
