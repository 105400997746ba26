#!/usr/bin/env bash
# MiniGPT-4 7B: ENCODER=... VICUNA=... PROJECTOR=... TRAIN_JSON=... COCO=... bash scripts/reproduce_adavib_minigpt4.sh
# (all variables and options: scripts/reproduce_adavib.sh)
ARCH=minigpt4 exec bash "$(dirname "$0")/reproduce_adavib.sh" "$@"
