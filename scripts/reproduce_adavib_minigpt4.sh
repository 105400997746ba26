#!/usr/bin/env bash
# MiniGPT-4 7B: ENCODER=... VICUNA=... PROJECTOR=... TRAIN_JSON=... COCO=... bash scripts/reproduce_adavib_minigpt4.sh
# Protocols: adavib-pope + opera-chair-500 (POPE_PROTOCOL / CHAIR_PROTOCOL to change; results.md names them per row).
# (all variables and options: scripts/reproduce_adavib.sh)
ARCH=minigpt4 exec bash "$(dirname "$0")/reproduce_adavib.sh" "$@"
