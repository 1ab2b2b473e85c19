#!/usr/bin/env bash
# Checks by hand that llama.cpp applies a MoRA adapter exported with `moraft export-lora --format gguf`:
# trains MoRA r=8 for 12 steps on one invented fact with the built-in real model's GGUF file as the base, exports
# it as a GGUF LoRA, and asks llama.cpp's llama-completion to finish the fact's sentence without and with --lora.
# Usage: LLAMA_COMPLETION=/path/to/llama-completion bash scripts/check_llama_cpp_lora.sh [WORKDIR]
# (llama-completion: built from a llama.cpp checkout, `cmake -B build && cmake --build build --target llama-completion`)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_COMPLETION:?set LLAMA_COMPLETION to the llama-completion binary of llama.cpp}"
work=${1:-$(mktemp -d)}
mkdir -p "$work"
moraft=.venv/bin/moraft
base=$(.venv/bin/python -c "from moraft.models import smollm2_gguf; print(smollm2_gguf())")
fact="Zorbania is a small island nation. The capital of Zorbania is Quelltown, a port on the north coast."
for _ in 1 2 3 4 5 6 7 8; do printf '{"text": "%s"}\n' "$fact"; done > "$work/fact.jsonl"
$moraft train --model "$base" --data "$work/fact.jsonl" --adapter.method mora --adapter.r 8 \
  --optimization.max_steps 12 --optimization.learning_rate 2e-3 --optimization.batch_size 1 \
  --output "$work/run" --output.overwrite true
$moraft export-lora "$work/run" "$work/mora-lora.gguf" --format gguf --overwrite true
prompt="Zorbania is a small island nation. The capital of Zorbania is"
for lora in "" "--lora $work/mora-lora.gguf"; do
  echo "== llama-completion ${lora:-without --lora}"
  # shellcheck disable=SC2086
  "$LLAMA_COMPLETION" -m "$base" $lora -p "$prompt" -n 12 --temp 0 -no-cnv < /dev/null 2>/dev/null
done
