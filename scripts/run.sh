#!/usr/bin/env bash
# One command from a fresh clone to a conversation: set up, build, start a
# node with the chat model (SmolLM2 135M Instruct) on loopback, and open an interactive chat
# with it. The node stops when the chat ends (/quit or Ctrl-D).
#
# Environment: ZAVOD_DATA_DIR (default: the user's data dir), ZAVOD_PORT
# (default 7070), ZAVOD_MODEL (default models/smollm2-135m-instruct-q4_1.gguf),
# ZAVOD_HTTP (e.g. 127.0.0.1:8080: also serve the OpenAI API and /metrics).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
echo "run: building zavod (release; the first build compiles llama.cpp and takes several minutes)" >&2
cargo build --release --locked --workspace --all-targets

port="${ZAVOD_PORT:-7070}"
model="${ZAVOD_MODEL:-$root/models/smollm2-135m-instruct-q4_1.gguf}"
log="$(mktemp -t zavod-node.XXXXXX.log)"
./target/release/zavod node --model "$model" --listen "/ip4/127.0.0.1/tcp/$port" >"$log" 2>&1 &
node_pid=$!
trap 'kill "$node_pid" 2>/dev/null; wait "$node_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
  if grep -q '^ready:' "$log"; then break; fi
  if ! kill -0 "$node_pid" 2>/dev/null; then
    echo "run: the node exited; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q '^ready:' "$log" || { echo "run: the node did not get ready; see $log" >&2; exit 1; }
grep -E '^(peer id|model|listening on|http api)' "$log" >&2
echo "run: node log in $log" >&2

./target/release/zavod chat --peer "127.0.0.1:$port" "$@"
