#!/usr/bin/env bash
# Builds llama.cpp's CPU tools (llama-bench, llama-simple, llama-perplexity, llama-quantize)
# from the source distribution of llama-cpp-python on PyPI, which vendors the llama.cpp tree,
# and installs them into PREFIX (default ~/.cache/edgenas/llama.cpp/<version>). Idempotent:
# a finished build is reused. Used by the tests' llama.cpp board, and usable on a board:
#   bash scripts/build_llama_cpp.sh [PREFIX]   (needs cmake, a C++ compiler and pip)
# Set LLAMA_CPP_CMAKE_ARGS for other back-ends, e.g. "-DGGML_CUDA=ON" on a Jetson.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PREFIX=${1:-${EDGENAS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgenas}/llama.cpp/$VERSION}
if [ -x "$PREFIX/bin/llama-bench" ] && [ -f "$PREFIX/BUILD_OK" ]; then
  echo "$PREFIX"; exit 0
fi
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
  "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# The sdist has no git history: take the vendored llama.cpp commit from its changelog, so the
# tools report their build (llama-bench's build_commit) instead of "unknown".
COMMIT=$(grep -o -m1 'ggml-org/llama.cpp@[0-9a-f]*' "$WORK/llama_cpp_python-$VERSION/CHANGELOG.md" | cut -d@ -f2 || true)
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}" ${LLAMA_CPP_CMAKE_ARGS:-} >&2
cmake --build "$WORK/build" -j "$(nproc)" \
  --target llama-bench llama-simple llama-perplexity llama-quantize >&2
mkdir -p "$PREFIX/bin"
for t in llama-bench llama-simple llama-perplexity llama-quantize; do
  cp "$WORK/build/bin/$t" "$PREFIX/bin/"
done
echo "llama-cpp-python $VERSION llama.cpp ${COMMIT:-unknown}" > "$PREFIX/BUILD_OK"
echo "$PREFIX"
