#!/usr/bin/env bash
# The project's test command: set up the environment from nothing (idempotent), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# The house's own checks first (seconds): style (ruff: pyflakes, pycodestyle errors, 120 columns, sorted imports)
# and the floors (import-linter's layers contract in pyproject.toml: each subpackage imports only from below).
.venv/bin/ruff check --quiet .
.venv/bin/lint-imports --no-cache > /tmp/lint-imports.$$.log || { cat /tmp/lint-imports.$$.log; exit 1; }
rm -f /tmp/lint-imports.$$.log
# Two pytest-xdist workers (TEST_WORKERS to change; 0 runs in this process). Most of the suite's time is Python
# start-up and imports in the processes tests launch, one core each, so two workers on 2 cores about halve it.
# --dist loadfile keeps each test file on one worker: a module's shared fixtures (a trained run, an export) are
# built once, not once per worker.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
