#!/usr/bin/env bash
# Starts a mesh of N nodes on loopback for trying zavod on one machine:
# node 1 founds the mesh, nodes 2..N join it with an invite. By default
# every node serves the development model; MODEL_NODES=K gives it to the
# last K nodes only (the others only route). Ports start at BASE_PORT
# (default 7400). Data lives in $MESH_DIR (default a temporary directory).
# Stop everything with Ctrl-C.
#
#   scripts/local-mesh.sh 3
#   MODEL_NODES=1 scripts/local-mesh.sh 3   # only node 3 has the model
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

n="${1:-3}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 32 ]; then
  echo "usage: scripts/local-mesh.sh N   (1 <= N <= 32)" >&2
  exit 2
fi
model_nodes="${MODEL_NODES:-$n}"
base="${BASE_PORT:-7400}"
dir="${MESH_DIR:-$(mktemp -d -t zavod-mesh.XXXXXX)}"
mkdir -p "$dir"
model="${ZAVOD_MODEL:-$root/models/gemma-3-270m-q4_k_m.gguf}"
threads="${ZAVOD_THREADS:-1}"

bash scripts/setup.sh
cargo build --release --locked --workspace --all-targets
zavod=./target/release/zavod

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_ready() {
  local log="$1" pid="$2"
  for _ in $(seq 1 600); do
    grep -q '^ready:' "$log" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a node exited; its log ($log):" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "a node did not become ready; see $log" >&2
  return 1
}

start() {
  local i="$1"; shift
  local args=(node --data-dir "$dir/node$i" --listen "/ip4/127.0.0.1/tcp/$((base + i))" --threads "$threads")
  if [ "$i" -gt $((n - model_nodes)) ]; then args+=(--model "$model"); fi
  "$zavod" "${args[@]}" "$@" >"$dir/node$i.log" 2>&1 &
  pids+=($!)
  wait_ready "$dir/node$i.log" "$!"
  echo "node $i: $(grep '^listening on' "$dir/node$i.log" | head -1 | cut -d' ' -f3)$( [ "$i" -gt $((n - model_nodes)) ] && echo '  (model)')"
}

start 1
token="$("$zavod" mesh invite --uses "$n" --data-dir "$dir/node1")"
for i in $(seq 2 "$n"); do start "$i" --join "$token"; done

cat <<EOT

mesh of $n nodes running; logs and data in $dir
  $zavod status --data-dir $dir/node1 --peer 127.0.0.1:$((base + 1))
  $zavod chat   --data-dir $dir/node1 --peer 127.0.0.1:$((base + 1)) --verbose
Ctrl-C stops the mesh.
EOT
wait
