#!/usr/bin/env bash
# Soak: a steady load of long calls plus constant call churn against one gateway, sampling the
# gateway's RSS from /metrics. Usage: bench/soak.sh [SECONDS=660] [STEADY_STREAMS=100]
# Writes bench/results/soak-*.json (loadtest's soak report) and prints RSS start/end/max.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SECS="${1:-660}"
STREAMS="${2:-100}"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29392; GP=28380; AP=29380
start_broker $BP
BROKER=$!
target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
  --insecure-skip-signature --log-level warn >/dev/null 2>&1 &
GW=$!
trap 'kill $CHURN 2>/dev/null; kill $GW $BROKER 2>/dev/null' EXIT
wait_ready $AP $GW
mkdir -p bench/results
# Churn: 20 short both-track calls every ~10 s for the whole soak.
( end=$((SECONDS + SECS)); while ((SECONDS < end)); do
    target/release/loadtest steady --url ws://127.0.0.1:$GP/stream --streams 20 --duration 8 \
      --tracks both --ramp-per-sec 20 --dtmf --audio ../shared/fixtures/speech-8k.ulaw --quiet >/dev/null 2>&1 || true
  done ) &
CHURN=$!
OUT="bench/results/soak-$(date +%Y%m%d-%H%M%S).json"
target/release/loadtest soak --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" --duration "$SECS" \
  --ramp-per-sec 50 --audio ../shared/fixtures/speech-8k.ulaw --gateway-metrics http://127.0.0.1:$AP/metrics \
  --metrics-every 10 --json-out "$OUT" --quiet || true
python3 - "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
g = r.get("gateway_rss") or {}
print(f"soak {r.get('wall_secs', 0):.0f}s: gateway RSS start {g.get('start_bytes', 0)/2**20:.1f} MiB, "
      f"end {g.get('end_bytes', 0)/2**20:.1f} MiB, max {g.get('max_bytes', 0)/2**20:.1f} MiB; "
      f"streams {r['streams']}; send lag p99 {r['send_lag']['p99_ms']} ms")
PY
curl -fs http://127.0.0.1:$AP/metrics | grep -E '^gateway_(frames_dropped_total|frames_published_total|frames_delivered_total|streams_total)' || true
