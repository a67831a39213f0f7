#!/usr/bin/env bash
# The transcription pipeline end to end through the real gateway (see gateway_e2e.py):
# installs the example's packages (setup.sh), the broker, builds the gateway and the Twilio
# simulator, then runs. Output and logs in examples/transcribe/.gateway-e2e/. ~2 minutes here.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$("$HERE/setup.sh")"
TANSU="$("$ROOT/scripts/install-broker.sh")"
(cd "$ROOT" && cargo build --release -p gateway -p loadtest >&2)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
exec "$PY" "$HERE/gateway_e2e.py" --tansu "$TANSU" --gateway "$TARGET/release/gateway" \
  --loadtest "$TARGET/release/loadtest" "$@"
