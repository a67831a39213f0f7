#!/usr/bin/env bash
# Bidirectional streams: STREAMS <Connect> calls against a fresh broker and gateway, an echo bot
# playing each caller's audio back through <prefix>.playback, everything verified (downlink
# audio, marks, clears, recorded playback). Prints the playback latency (record produced → its
# first media frame received by the simulated Twilio) and the fault count.
# Usage: bench/bidi.sh [STREAMS=200] [SECS=60]
#   env GATEWAY_ARGS: extra gateway flags; LOADTEST_ARGS: extra loadtest flags (they come last
#   and override the defaults below); PROBE_ARGS: '' to run without the uplink latency probe.
# Harness defaults chosen to keep the harness off the local broker (Tansu 0.6's memory engine
# lists every stored batch of a partition on each fetch that finds data, so its cost grows
# with run time and with the number of small batches; see docs/benchmarks.md):
#   --no-verify-inbound         the echo bot is the uplink's one full reader (uplink
#                               verification is the steady scenario's job)
#   --verify-fetch-wait-ms 100  the verifier and the echo bot are not on the measured path
#   --echo-linger-ms 5          fewer, larger playback batches (inside the measured latency)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-200}"
SECS="${2:-60}"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29792; GP=28780; AP=29780
mkdir -p bench/results
OUT="bench/results/bidi-$STREAMS-$(date +%Y%m%d-%H%M%S).json"
start_broker $BP
B=$!
FETCH_WAIT=$(tansu_fetch_wait "${GATEWAY_ARGS:-}")
# shellcheck disable=SC2086
target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
  --insecure-skip-signature --log-level warn --topic-prefix bidi $FETCH_WAIT ${GATEWAY_ARGS:-} \
  >/dev/null 2>&1 &
G=$!
trap 'kill -9 $G $B 2>/dev/null || true' EXIT
wait_ready $AP $G
target/release/loadtest bidirectional --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" \
  --duration "$SECS" --verify-brokers 127.0.0.1:$BP --topic-prefix bidi \
  --audio ../shared/fixtures/speech-8k.ulaw ${PROBE_ARGS---latency-probe} --echo-merge-burst \
  --no-verify-inbound --verify-fetch-wait-ms 100 --echo-linger-ms 5 ${LOADTEST_ARGS:-} \
  --json-out "$OUT" --quiet >/dev/null 2>&1 || true
curl -fs http://127.0.0.1:$AP/metrics | grep -E "^gateway_playback_((read_)?latency|mark_alignment)_seconds_(bucket|count|sum)" > "$OUT.gateway-metrics" || true
python3 - "$OUT" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
d = r["bidirectional"]["downlink"]
p = d["playback_latency"]
print(f"playback latency (produced -> first frame): n={p.get('count')} p50={p.get('p50_ms')} "
      f"p90={p.get('p90_ms')} p99={p.get('p99_ms')} max={p.get('max_ms')} ms; "
      f"stamp->verify p99={d['stamp_to_verify'].get('p99_ms')} ms; faults={d['faults']}")
# Mark alignment (gateway histogram): |Twilio's echo of a played mark - where the gateway placed
# the end of the audio before it|, i.e. the error of the outbound recording's timeline.
b = []
for line in open(sys.argv[1] + ".gateway-metrics"):
    m = re.match(r'gateway_playback_mark_alignment_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
    if m:
        b.append((float(m.group(1)), float(m.group(2))))
if b and b[-1][1] > 0:
    n = b[-1][1]
    def q(f):
        return next(le for le, c in b if c >= f * n)
    print(f"mark alignment (gateway histogram, bucket upper bounds): n={int(n)} "
          f"p50<={q(0.5)*1e3:g} ms p90<={q(0.9)*1e3:g} ms p99<={q(0.99)*1e3:g} ms")
PY
