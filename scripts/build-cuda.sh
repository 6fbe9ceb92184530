#!/usr/bin/env bash
# Builds zavod with llama.cpp's CUDA backend on a machine that has no CUDA
# toolkit installed: nvcc, the CUDA headers, cudart and cuBLAS come from
# NVIDIA's wheels on the Python package registry (CUDA 13.0, the release the
# 580 drivers run), unpacked once under target/cuda-toolkit.
#
#   scripts/build-cuda.sh            # kernels for sm_90 (H100, H200)
#   ZAVOD_CUDA_ARCHS="89;90" scripts/build-cuda.sh
#   ZAVOD_CUDA_FA=ON scripts/build-cuda.sh   # with flash-attention kernels
#
# The result is target/cuda/release/zavod with llama.cpp's shared libraries
# beside it (found through an $ORIGIN run path), so the folder can be copied
# to a GPU machine as it is. At run time the machine needs an NVIDIA driver
# and libcudart.so.13 and libcublas.so.13 on the library path (its own CUDA
# install, or the same wheels: `pip install nvidia-cuda-runtime nvidia-cublas`
# and LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib).
#
# Only the kernels of the named architectures are built, and by default no
# flash-attention kernels (a third of the CUDA sources, the slowest to
# compile): all of them would take hours on a small machine. With a system CUDA toolkit (nvcc on PATH),
# that one is used instead of the wheels.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tk="${ZAVOD_CUDA_TOOLKIT:-$root/target/cuda-toolkit}"
archs="${ZAVOD_CUDA_ARCHS:-90}"
log() { printf 'build-cuda: %s\n' "$*" >&2; }

if command -v nvcc >/dev/null 2>&1 && [ -z "${ZAVOD_CUDA_TOOLKIT:-}" ]; then
  cuda_root="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
  log "using the system CUDA toolkit at $cuda_root"
else
  cuda_root="$tk/nvidia/cu13"
  if [ ! -x "$cuda_root/bin/nvcc" ]; then
    log "fetching the CUDA 13.0 toolkit wheels into $tk"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
      "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" \
      "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
    mkdir -p "$tk"
    for whl in "$tmp"/*.whl; do
      python3 -m zipfile -e "$whl" "$tk"
    done
    chmod +x "$cuda_root"/bin/* "$cuda_root"/nvvm/bin/* 2>/dev/null || true
  fi
  # The wheels ship only versioned libraries; CMake and the linker look for
  # the unversioned names.
  for lib in cudart cublas cublasLt; do
    so="$(ls "$cuda_root/lib/lib$lib.so."* 2>/dev/null | head -1)"
    [ -n "$so" ] || { log "lib$lib missing from $cuda_root/lib"; exit 1; }
    ln -sf "$(basename "$so")" "$cuda_root/lib/lib$lib.so"
  done
  log "using the CUDA toolkit from wheels at $cuda_root"
fi

export PATH="$cuda_root/bin:$PATH"
export CUDA_PATH="$cuda_root"
export CUDAToolkit_ROOT="$cuda_root"
export CMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc"
export CMAKE_CUDA_ARCHITECTURES="$archs"
export GGML_CUDA_FA="${ZAVOD_CUDA_FA:-OFF}"
export LIBRARY_PATH="$cuda_root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A portable CPU baseline (AVX2) rather than this machine's own CPU: the
# binary runs on another machine. $ORIGIN lets it find llama.cpp's shared
# libraries in its own folder.
export RUSTFLAGS="-C target-cpu=x86-64-v3 -C link-arg=-Wl,-rpath,\$ORIGIN"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"

log "building zavod with CUDA kernels for sm_$archs (this takes a while)"
cd "$root"
cargo build --release --locked -p zavod --features cuda
out="$CARGO_TARGET_DIR/release"
# Cargo links only the unversioned names beside the binary, as symbolic
# links that point nowhere there; the binary asks for the sonames.
lib_dir="$(ls -td "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/lib | head -1)"
for so in "$lib_dir"/lib*.so.[0-9]; do
  rm -f "$out/$(basename "$so")"
  cp -L "$so" "$out/$(basename "$so")"
done
log "built $out/zavod; shared libraries beside it:"
ls -1 "$out"/lib*.so.[0-9] >&2
