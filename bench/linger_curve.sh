#!/usr/bin/env bash
# Latency and CPU against linger.ms at one load: for each value, a fresh broker and gateway,
# STREAMS real-time calls for SECS with full verification and the sampled latency probe.
# Usage: bench/linger_curve.sh [STREAMS=500] [SECS=60] [LINGERS="5 10 20 50"] [TRACKS=both]
#   env GATEWAY_ARGS / LOADTEST_ARGS: extra flags (e.g. LOADTEST_ARGS="--verify-fetch-wait-ms
#   100" keeps the full verifier's fetches off the broker the probe measures;
#   LOADTEST_ARGS="--verify-after-load" keeps them off entirely: the probe alone reads live and
#   everything is verified after the load).
# Prints per value: e2e p50/p99 (verifier, and the independent probe), harness lag, gateway
# CPU µs per media message, loss; then the probe's p99 per 10 s window and the gateway's own
# receive → broker ack p99 (Prometheus bucket bound) per 10 s scrape, to see when and where a
# long run's latency moved.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-500}"
SECS="${2:-60}"
LINGERS="${3:-5 10 20 50}"
TRACKS="${4:-both}"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29692; GP=28680; AP=29680
TICK=$(getconf CLK_TCK)
mkdir -p bench/results
FETCH_WAIT=$(tansu_fetch_wait "${GATEWAY_ARGS:-}")
for L in $LINGERS; do
  start_broker $BP
  B=$!
  target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
    --insecure-skip-signature --log-level warn --topic-prefix "lc$L" $FETCH_WAIT \
    ${GATEWAY_ARGS:-} $( [ "$L" = default ] || echo "--kafka-option linger.ms=$L" ) >/dev/null 2>&1 &
  G=$!
  wait_ready $AP $G
  OUT="bench/results/linger-$L-$STREAMS-$(date +%H%M%S).json"
  c0=$(awk '{print $14 + $15}' /proc/$G/stat)
  target/release/loadtest steady --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" --duration "$SECS" \
    --tracks "$TRACKS" --ramp-per-sec 100 --audio ../shared/fixtures/speech-8k.ulaw \
    --verify-brokers 127.0.0.1:$BP --topic-prefix "lc$L" --latency-probe --gateway-metrics "http://127.0.0.1:$AP/metrics" --json-out "$OUT" --quiet ${LOADTEST_ARGS:-} \
    >/dev/null 2>&1 || true
  c1=$(awk '{print $14 + $15}' /proc/$G/stat)
  kill $G $B 2>/dev/null; wait $G $B 2>/dev/null || true
  python3 - "$OUT" "$L" "$(( c1 - c0 ))" "$TICK" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); L = sys.argv[2]; cpu = int(sys.argv[3]) / int(sys.argv[4])
v = r["verification"]; t = v["total"]; lat = v["latency"]
p = (v.get("probe") or {}).get("send_to_receipt") or {}
h = v["harness"]["receipt_to_verify"]
msgs = r["media_sent"]
e2e = ("read back after the load" if v.get("read_after_load")
       else f"e2e p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} ms")
print(f"linger {L}: {e2e} | probe p50 {p.get('p50_ms')} p99 {p.get('p99_ms')} ms "
      f"| harness receipt->verify p99 {h.get('p99_ms')} ms | gateway {cpu*1e6/max(msgs,1):.2f} us/msg "
      f"| missing {t['missing']} dup {t['duplicated']} ooo {t['out_of_order']} mismatch {t['pcm_mismatches']}")
w = (v.get("probe") or {}).get("windows") or []
if w:
    print("  probe p99 per 10 s window (ms; - = no record): " + " ".join(
        f"{x['send_to_receipt']['p99_ms']:.0f}" if x["send_to_receipt"]["count"] else "-" for x in w))
a = r.get("gateway_ack_latency") or []
if a:
    # null bound: no acknowledgement in the interval (records 0), else above the last bucket.
    le = lambda x, k: "-" if not x["records"] else "inf" if x.get(k) is None else f"{x[k]:.0f}"
    print("  gateway receive->ack p99 bound per scrape (ms): " + " ".join(le(x, "p99_le_ms") for x in a))
    print("  of which produce->ack (librdkafka + broker) p99 bound (ms): " + " ".join(le(x, "produce_p99_le_ms") for x in a))
PY
done
