#!/usr/bin/env bash
# Bidirectional streams: STREAMS <Connect> calls against a fresh broker and gateway, an echo bot
# playing each caller's audio back through <prefix>.playback, everything verified (downlink
# audio, marks, clears, recorded playback). Prints the playback latency (record produced → its
# first media frame received by the simulated Twilio) and the fault count.
# Usage: bench/bidi.sh [STREAMS=200] [SECS=60]   (env GATEWAY_ARGS for extra gateway flags)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-200}"
SECS="${2:-60}"
"$ROOT/scripts/setup.sh" >/dev/null
cargo build --release -p gateway -p loadtest 2>/dev/null
TANSU="$("$ROOT/scripts/install-broker.sh")"
BP=29792; GP=28780; AP=29780
mkdir -p bench/results
OUT="bench/results/bidi-$STREAMS-$(date +%Y%m%d-%H%M%S).json"
"$TANSU" broker --listener-url tcp://127.0.0.1:$BP --advertised-listener-url tcp://127.0.0.1:$BP \
  --storage-engine memory://tansu/ >/dev/null 2>&1 &
B=$!
sleep 1
# shellcheck disable=SC2086
target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
  --insecure-skip-signature --log-level warn --topic-prefix bidi ${GATEWAY_ARGS:-} >/dev/null 2>&1 &
G=$!
trap 'kill -9 $G $B 2>/dev/null || true' EXIT
until curl -fs http://127.0.0.1:$AP/readyz >/dev/null 2>&1; do sleep 0.2; done
target/release/loadtest bidirectional --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" \
  --duration "$SECS" --verify-brokers 127.0.0.1:$BP --topic-prefix bidi \
  --audio ../shared/fixtures/speech-8k.ulaw --latency-probe --echo-merge-burst \
  --json-out "$OUT" --quiet >/dev/null 2>&1 || true
curl -fs http://127.0.0.1:$AP/metrics | grep -E "^gateway_playback_(read_)?latency_seconds_(bucket|count|sum)" > "$OUT.gateway-metrics" || true
python3 - "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d = r["bidirectional"]["downlink"]
p = d["playback_latency"]
print(f"playback latency (produced -> first frame): n={p.get('count')} p50={p.get('p50_ms')} "
      f"p90={p.get('p90_ms')} p99={p.get('p99_ms')} max={p.get('max_ms')} ms; "
      f"stamp->verify p99={d['stamp_to_verify'].get('p99_ms')} ms; faults={d['faults']}")
PY
