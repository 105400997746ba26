#!/usr/bin/env bash
# Smoke run of the training recipe: set up from nothing, build the tiny data, train AdaVIB on a tiny random-init
# MiniGPT-4 (train_configs/tiny_cpu.yaml). The main job is scripts/run_experiment.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0 bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python scripts/prepare_tiny.py --out data/tiny
.venv/bin/python train.py --cfg-path train_configs/tiny_cpu.yaml "$@"
echo "outputs: out/tiny_cpu/ (metrics.jsonl, checkpoints/, final/trainable.safetensors)"
