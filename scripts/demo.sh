#!/usr/bin/env bash
# Quick start, command 1: set up (once) and run the main job on its built-in default: the built-in real model
# (SmolLM2-135M-Instruct, offline) taught 128 invented facts, LoRA r=8 against MoRA r=8, what each learned and what
# each forgot (about 10 minutes on 2 CPU cores). Arguments go to `moraft demo`; without a --model of their own the
# real model is used. `bash scripts/demo.sh --model builtin:tiny-llama` runs the toy demo instead (UUID pairs on a
# random-init tiny LLaMA, 3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for arg in "$@"; do
  case "$arg" in --model|--model=*) exec .venv/bin/moraft demo "$@" ;; esac
done
exec .venv/bin/moraft demo --model builtin:smollm2-135m-instruct "$@"
