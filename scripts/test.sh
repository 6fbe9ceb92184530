#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: unit tests, protocol tests,
# the llama.cpp engine against the real model, and the multi-process
# end-to-end tests that start the real `zavod` binary on loopback.
# Everything builds once, in the release profile, so the binaries the
# end-to-end tests start are the ones already built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh

echo "test: building (release)" >&2
cargo build --release --workspace --all-targets --locked

echo "test: running tests" >&2
cargo test --release --workspace --locked

# The deterministic simulator: 200 seeds of every scenario, each run twice to
# check the trace hashes repeat; seeds run on every CPU. The 1,000-node mesh
# gets 100 seeds: at about 7 s per seed per core on a 2-core machine, 200
# of them (twice) took 23 of CI's 54 minutes.
echo "test: simulations" >&2
for s in steady partition-heal crash-storm slow-node stale-gossip-herd conversations adversarial memory-steady memory-faults; do
  ./target/release/zavod-sim --scenario "simulations/$s.toml" --seeds 200
done
./target/release/zavod-sim --scenario simulations/mesh-1000.toml --seeds 100
