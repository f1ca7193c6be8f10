#!/usr/bin/env bash
# Builds llama.cpp's CPU tools (llama-bench, llama-simple, llama-perplexity, llama-quantize)
# and its shared libraries from the source distribution of llama-cpp-python on PyPI, which
# vendors the llama.cpp tree, and installs them into PREFIX (default
# ~/.cache/edgenas/llama.cpp/<version>): bin/, lib/, and python/llama_cpp, that package's
# Python binding over lib/ (PYTHONPATH=PREFIX/python; it needs numpy, jinja2, diskcache,
# typing-extensions). Idempotent: a finished build is reused. Used by the tests' llama.cpp board, and usable on a board:
#   bash scripts/build_llama_cpp.sh [PREFIX]   (needs cmake, a C++ compiler and pip)
# Set LLAMA_CPP_CMAKE_ARGS for other back-ends, e.g. "-DGGML_CUDA=ON" on a Jetson.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PREFIX=${1:-${EDGENAS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgenas}/llama.cpp/$VERSION}
if [ -x "$PREFIX/bin/llama-bench" ] && [ -d "$PREFIX/python/llama_cpp" ] && [ -f "$PREFIX/BUILD_OK" ]; then
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
# Shared libraries for the binding; the tools find them in ../lib.
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN/../lib' \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}" ${LLAMA_CPP_CMAKE_ARGS:-} >&2
cmake --build "$WORK/build" -j "$(nproc)" \
  --target llama llama-bench llama-simple llama-perplexity llama-quantize >&2
rm -rf "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/python"
mkdir -p "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/python"
for t in llama-bench llama-simple llama-perplexity llama-quantize; do
  cp "$WORK/build/bin/$t" "$PREFIX/bin/"
done
find "$WORK/build" -name 'lib*.so*' -exec cp -P {} "$PREFIX/lib/" \;
cp -r "$WORK/llama_cpp_python-$VERSION/llama_cpp" "$PREFIX/python/"
ln -s ../../lib "$PREFIX/python/llama_cpp/lib"
echo "llama-cpp-python $VERSION llama.cpp ${COMMIT:-unknown}" > "$PREFIX/BUILD_OK"
echo "$PREFIX"
