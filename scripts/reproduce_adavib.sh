#!/usr/bin/env bash
# Reproduce the AdaVIB comparison from your own weights and COCO folders, for ARCH = minigpt4 | llava15:
# train linear-CE, fixed-β VIB and AdaVIB projectors (same data, steps, seed), evaluate them and the released
# model on POPE (3 splits) and CHAIR, and write the results table. Thin wrappers:
# scripts/reproduce_adavib_minigpt4.sh and scripts/reproduce_adavib_llava15.sh.
#
#   ARCH=minigpt4:
#     ENCODER=weights/minigpt4_encoder.safetensors   # scripts/convert_lavis_checkpoint.py output
#     VICUNA=weights/vicuna-7b-v0                    # HF-format folder
#     PROJECTOR=weights/prerained_minigpt4_7b.pth    # released stage-2 projector
#   ARCH=llava15:
#     LLAVA=weights/llava-1.5-7b-hf                  # local llava-hf folder (its MLP is the starting projector)
#   TRAIN_JSON=data/lure/detail_5k.json            # [{"image_id", "caption"}]
#   COCO=data/coco                                 # train2014/ val2014/ annotations/
#   NGPU=8                                         # GPUs on this node (default: all visible)
#   POPE_PROTOCOL / CHAIR_PROTOCOL                 # named protocols (python -m minigpt4.eval.protocols); defaults:
#                                                  #   minigpt4: adavib-pope + opera-chair-500
#                                                  #   llava15:  llava15-pope + opera-chair-500
#   CHAIR_IMAGES=my_eval.json                      # the image list, for CHAIR_PROTOCOL=adavib-chair (AdaVIB's own
#                                                  #   eval.json is not public); COCO/val2014 must hold the images
#   OUT=out/reproduce
#   MODEL_OPTIONS / TRAIN_OPTIONS / EVAL_OPTIONS   extra space-separated --options for every model / train / eval call
#   ARCH=minigpt4 ENCODER=... VICUNA=... PROJECTOR=... TRAIN_JSON=... COCO=... bash scripts/reproduce_adavib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-minigpt4}
: "${TRAIN_JSON:?set TRAIN_JSON}" "${COCO:?set COCO}"
NGPU=${NGPU:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
OUT=${OUT:-out/reproduce}
PY=${PY:-python}
ACCUM=$(( 8 / NGPU > 0 ? 8 / NGPU : 1 ))   # keep the effective batch at 2 × 8 = 16
LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU")

read -r -a EXTRA_MODEL <<< "${MODEL_OPTIONS:-}"
read -r -a EXTRA_TRAIN <<< "${TRAIN_OPTIONS:-}"
read -r -a EXTRA_EVAL <<< "${EVAL_OPTIONS:-}"
case "$ARCH" in
  minigpt4)
    : "${ENCODER:?set ENCODER to the converted encoder safetensors}" "${VICUNA:?set VICUNA to the Vicuna-7B v0 folder}"
    : "${PROJECTOR:?set PROJECTOR to prerained_minigpt4_7b.pth}"
    MODEL=(model.encoder_path="$ENCODER" model.llm_path="$VICUNA" "${EXTRA_MODEL[@]}")
    START=(model.projector_path="$PROJECTOR")      # the released projector: starting point and baseline
    SUFFIX=minigpt4_7b ORIGINAL=eval_configs/minigpt4_7b_original.yaml
    POPE_PROTOCOL=${POPE_PROTOCOL:-adavib-pope} ;;
  llava15)
    : "${LLAVA:?set LLAVA to the local llava-hf LLaVA-1.5-7B folder}"
    MODEL=(model.llava_path="$LLAVA" "${EXTRA_MODEL[@]}")
    START=()                                       # the folder's own projector is the starting point
    SUFFIX=llava15_7b ORIGINAL=eval_configs/original_llava15_7b.yaml
    POPE_PROTOCOL=${POPE_PROTOCOL:-llava15-pope} ;;
  *) echo "ARCH must be minigpt4 or llava15, got '$ARCH'" >&2; exit 2 ;;
esac

# Every model is evaluated under the same named protocols; results.md names them and their sources per row.
CHAIR_PROTOCOL=${CHAIR_PROTOCOL:-opera-chair-500}
PROTOCOLS=(eval.pope.protocol="$POPE_PROTOCOL" eval.chair.protocol="$CHAIR_PROTOCOL")
if [ -n "${CHAIR_IMAGES:-}" ]; then PROTOCOLS+=(eval.chair.images="$CHAIR_IMAGES"); fi
"$PY" - "$POPE_PROTOCOL" "$CHAIR_PROTOCOL" "${CHAIR_IMAGES:-}" <<'CHECK' || exit 2   # stops here, not after training
import sys
from minigpt4.eval.protocols import get_protocol
try:
    pope, chair = get_protocol(sys.argv[1], "pope"), get_protocol(sys.argv[2], "chair")
except KeyError as err:
    sys.exit(f"error: POPE_PROTOCOL / CHAIR_PROTOCOL: {err.args[0]}")
if chair.image_set == "user-list" and not sys.argv[3]:
    sys.exit(f"error: CHAIR_PROTOCOL={chair.name} runs on your own image list: set CHAIR_IMAGES")
CHECK

for setting in linear_ce vib_fixed_beta adavib; do
  if [ ! -f "$OUT/train_$setting/final/trainable.safetensors" ]; then
    "${LAUNCH[@]}" train.py --cfg-path "train_configs/${setting}_${SUFFIX}.yaml" --resume --options "${MODEL[@]}" \
      "${START[@]}" datasets.caption_json.ann_path="$TRAIN_JSON" \
      datasets.caption_json.image_dir="$COCO/train2014" run.grad_accum_steps="$ACCUM" run.output_dir="$OUT/train_$setting" \
      "${EXTRA_TRAIN[@]}"
  fi
done

EVAL=(eval.image_dir="$COCO/val2014" eval.chair.coco_annotations="$COCO/annotations" "${PROTOCOLS[@]}" "${EXTRA_EVAL[@]}")
"${LAUNCH[@]}" evaluate.py --cfg-path "$ORIGINAL" --options "${MODEL[@]}" \
  "${START[@]}" "${EVAL[@]}" eval.output_dir="$OUT/eval_original"
for setting in linear_ce vib_fixed_beta adavib; do
  "${LAUNCH[@]}" evaluate.py --cfg-path "eval_configs/${setting}_${SUFFIX}.yaml" --options "${MODEL[@]}" \
    model.ckpt="$OUT/train_$setting/final/trainable.safetensors" "${EVAL[@]}" eval.output_dir="$OUT/eval_$setting"
done

"$PY" scripts/results_table.py "$OUT"/eval_original/metrics.json "$OUT"/eval_{linear_ce,vib_fixed_beta,adavib}/metrics.json \
  --out "$OUT/results.md"
# Each model against linear-CE on the same images (paired bootstrap: tighter than comparing the ± above).
{
  printf '\n## Paired differences to linear-CE (B − A, percentage points)\n'
  for setting in original vib_fixed_beta adavib; do
    printf '\n### %s\n\n' "$setting"
    "$PY" -m minigpt4.eval.paired --markdown "$OUT/eval_linear_ce" "$OUT/eval_$setting"
  done
} >> "$OUT/results.md"
cat "$OUT/results.md"
