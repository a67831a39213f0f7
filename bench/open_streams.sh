#!/usr/bin/env bash
# Memory per open stream: N streams open at once (opened at RAMP/s, each sending one chunk per
# second, --speed 0.02, for 80 s of wall time), fresh broker and gateway, everything verified.
# Prints the gateway's RSS before the first stream and its plateau while all are open, and
# the difference per stream.
# Usage: bench/open_streams.sh [STREAMS=10000] [RAMP=1000]   (needs `ulimit -n` > STREAMS + 100)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-10000}"
RAMP="${2:-1000}"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29992; GP=28980; AP=29980
mkdir -p bench/results
OUT="bench/results/open-$STREAMS-$(date +%Y%m%d-%H%M%S).json"
start_broker $BP
B=$!
target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
  --insecure-skip-signature --log-level warn --topic-prefix open >/dev/null 2>&1 &
G=$!
S=""
trap 'kill -9 $G $B $S 2>/dev/null || true' EXIT
wait_ready $AP $G
sleep 2
RSS0=$(awk '/VmRSS/ {print $2}' /proc/$G/status)
# RSS every second while the streams run; the plateau is the median of the samples taken
# between all streams being open and the first one ending.
( while kill -0 $G 2>/dev/null; do awk '/VmRSS/ {print $2}' /proc/$G/status; sleep 1; done ) \
  > "$OUT.rss" &
S=$!
target/release/loadtest steady --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" \
  --ramp-per-sec "$RAMP" --speed 0.02 --duration 1.6 --audio ../shared/fixtures/speech-8k.ulaw \
  --verify-brokers 127.0.0.1:$BP --topic-prefix open --verify-fetch-wait-ms 100 \
  --json-out "$OUT" --quiet >/dev/null 2>&1 || true
python3 - "$OUT" "$RSS0" "$STREAMS" "$RAMP" <<'PY'
import json, statistics, sys
out, rss0, n, ramp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r = json.load(open(out))
samples = [int(x) for x in open(out + ".rss") if x.strip()]
open_at = int(n / ramp) + 3          # every stream open (plus slack)
plateau = samples[open_at:open_at + 60]
mid = statistics.median(plateau)
v = r["verification"]
print(f"{n} open streams: completed {r['streams']['completed']}, close codes {r['close_codes']}, "
      f"missing {v['total']['missing']}, dropped {v['gateway_frames_dropped']}; "
      f"RSS {rss0/1024:.1f} MiB idle -> {mid/1024:.1f} MiB open (median of {len(plateau)} s) = "
      f"{(mid - rss0) / n:.1f} KiB per open stream")
PY
