#!/usr/bin/env bash
# Quick start, command 1: set up (once) and run the main job on its built-in default:
# LoRA r=8 vs MoRA r=8 on the uuid-memory task with the built-in tiny LLaMA (offline, a few minutes on 2 CPU cores).
# Arguments go to `moraft demo`: `bash scripts/demo.sh --model builtin:smollm2-135m-instruct` teaches a real model
# invented facts instead (see the README's demo section).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moraft demo "$@"
