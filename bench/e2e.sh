#!/usr/bin/env bash
# One command for the end-to-end benchmark (see bench/e2e.py): builds the release binaries,
# installs the broker, runs gateway and floor server under the same loads.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
cargo build --release -p gateway -p loadtest -p bench --bins
exec python3 "$ROOT/bench/e2e.py" "$@"
