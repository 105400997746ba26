#!/usr/bin/env bash
# The main job: set up from nothing, build the shapes worlds if missing, fine-tune the shapes-world base
# model's projector three ways (linear-CE, VIB fixed β, AdaVIB), evaluate CHAIR + POPE, print the table.
#   bash scripts/run_experiment.sh                   # one seed (16 min measured on 2 busy CPU cores)
#   bash scripts/run_experiment.sh --seeds 0 1 2     # mean ± std over three seeds (+11 min)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0 bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python scripts/shapes_experiment.py "$@"
