#!/usr/bin/env bash
# LLaVA-1.5 7B: LLAVA=weights/llava-1.5-7b-hf TRAIN_JSON=... COCO=... bash scripts/reproduce_adavib_llava15.sh
# Protocols: llava15-pope + opera-chair-500 (POPE_PROTOCOL / CHAIR_PROTOCOL to change; results.md names them per row).
# (all variables and options: scripts/reproduce_adavib.sh)
ARCH=llava15 exec bash "$(dirname "$0")/reproduce_adavib.sh" "$@"
