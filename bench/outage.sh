#!/usr/bin/env bash
# Broker outage under load: STREAMS real-time calls (both tracks by default) through one gateway;
# at OUTAGE_AT seconds the broker is paused (SIGSTOP) for OUTAGE seconds; optionally the gateway
# is killed (kill -9) KILL_AT seconds into the outage and restarted with the same spool.
# Every record is verified by the loadtest's consumer (bit-exact, order, duplicates counted).
#
# Usage: bench/outage.sh [STREAMS=500] [OUTAGE=60] [SPOOL=disk|memory] [KILL_AT=]
#   e.g. bench/outage.sh 500 60 disk          # the issue-12 target: zero loss, RSS ≤ 512 MiB
#        bench/outage.sh 500 10 memory        # no --spool-dir, default budget
#        bench/outage.sh 200 40 disk 20       # kill -9 20 s into the outage, restart
#        TERM_AT=2 bench/outage.sh 200 30 disk # SIGTERM 2 s into the replay, broker paused
#                                             # again (the final flush times out), restart
# Env: TRACKS (both|inbound), OUTAGE_AT (20), TAIL (after the outage, 60), GATEWAY_ARGS,
#      TERM_AT (seconds after the broker resumes; use short --drain-timeout/--flush-timeout).
# Writes bench/results/outage-*.{json,csv} and prints a summary (RSS max, drain time, loss).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-500}"
OUTAGE="${2:-60}"
SPOOL="${3:-disk}"
KILL_AT="${4:-}"
TRACKS="${TRACKS:-both}"
OUTAGE_AT="${OUTAGE_AT:-20}"
TAIL="${TAIL:-60}"
TERM_AT="${TERM_AT:-}"
DURATION=$((OUTAGE_AT + OUTAGE + 20))
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29492; GP=28480; AP=29480
STAMP="$(date +%Y%m%d-%H%M%S)"
mkdir -p bench/results
OUT="bench/results/outage-$STAMP"
SPOOLDIR="$(mktemp -d /tmp/gw-outage-spool.XXXXXX)"
PREFIX="outage$STAMP"
start_broker $BP
BROKER=$!
GW=""
cleanup() {
  # Teardown, not a test of shutdown: SIGKILL (a SIGTERM'd gateway would drain for 30 s).
  kill -CONT $BROKER 2>/dev/null || true
  kill -9 $(jobs -p) 2>/dev/null || true
  [ -n "$GW" ] && kill -9 $GW 2>/dev/null || true
  kill -9 $BROKER 2>/dev/null || true
  rm -rf "$SPOOLDIR"
}
trap cleanup EXIT
gw_args=(--listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP
  --topic-prefix "$PREFIX" --insecure-skip-signature --log-level warn)
[ "$SPOOL" = disk ] && gw_args+=(--spool-dir "$SPOOLDIR")
# shellcheck disable=SC2206
gw_args+=(${GATEWAY_ARGS:-})
start_gateway() {
  target/release/gateway "${gw_args[@]}" 2>>"$OUT.gateway.log" &
  GW=$!
  until curl -fs http://127.0.0.1:$AP/readyz >/dev/null 2>&1; do sleep 0.2; done
}
start_gateway
metric() { curl -fs http://127.0.0.1:$AP/metrics 2>/dev/null | awk -v m="$1" '$1==m {print $2}' | head -1; }
# Sample RSS, spool and in-flight gauges every second.
echo "t,rss_bytes,inflight_bytes,spool_memory_records,spool_disk_records,spool_disk_bytes,dropped" >"$OUT.csv"
( t0=$SECONDS; while true; do
    m="$(curl -fs http://127.0.0.1:$AP/metrics 2>/dev/null || true)"
    g() { printf '%s\n' "$m" | awk -v k="$1" '$1==k {print $2}' | head -1; }
    d="$(printf '%s\n' "$m" | awk '/^gateway_frames_dropped_total/ {s+=$2} END {print s+0}')"
    echo "$((SECONDS - t0)),$(g process_resident_memory_bytes),$(g gateway_inflight_bytes),$(g 'gateway_spool_records{tier="memory"}'),$(g 'gateway_spool_records{tier="disk"}'),$(g 'gateway_spool_bytes{tier="disk"}'),$d" >>"$OUT.csv"
    sleep 1
  done ) &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null; cleanup' EXIT
target/release/loadtest steady --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" \
  --duration "$DURATION" --tracks "$TRACKS" --ramp-per-sec 100 \
  --audio ../shared/fixtures/speech-8k.ulaw --verify-brokers 127.0.0.1:$BP --topic-prefix "$PREFIX" \
  --grace $((OUTAGE + TAIL)) --json-out "$OUT.json" --quiet >"$OUT.loadtest.log" 2>&1 &
LT=$!
sleep "$OUTAGE_AT"
kill -STOP $BROKER
echo "broker paused at $(date +%T)"
if [ -n "$KILL_AT" ]; then
  sleep "$KILL_AT"
  kill -9 $GW; wait $GW 2>/dev/null || true
  echo "gateway killed at $(date +%T) (${KILL_AT}s into the outage)"
  echo "on disk after the kill: $(target/release/gateway spool-inspect "$SPOOLDIR" | tail -1)"
  # Twilio would reconnect calls to another instance; the load generator's calls on this one
  # end here. The restarted gateway must deliver what reached the spool.
  sleep $((OUTAGE - KILL_AT))
  kill -CONT $BROKER
  echo "broker resumed at $(date +%T)"
  start_gateway
else
  sleep "$OUTAGE"
  kill -CONT $BROKER
  echo "broker resumed at $(date +%T)"
fi
RESUMED=$SECONDS
if [ -n "$TERM_AT" ]; then
  # A clean shutdown in the middle of the replay, with the broker gone again: the final flush
  # times out and what is unacknowledged goes to the spool's prefix (decision 44).
  sleep "$TERM_AT"
  echo "replayed so far: $(metric gateway_spool_replayed_records_total)"
  kill -STOP $BROKER
  kill -TERM $GW
  wait $GW 2>/dev/null || true
  echo "gateway stopped (SIGTERM) at $(date +%T), ${TERM_AT}s into the replay"
  echo "on disk after the stop: $(target/release/gateway spool-inspect "$SPOOLDIR" | tail -1)"
  ls "$SPOOLDIR" | grep -c cursor | sed 's/^/cursor files: /' || true
  kill -CONT $BROKER
  start_gateway
  RESUMED=$SECONDS
fi
# Drain time: until nothing is queued in the spool and the in-flight budget is back to idle.
while true; do
  mem="$(metric 'gateway_spool_records{tier="memory"}')"; disk="$(metric 'gateway_spool_records{tier="disk"}')"
  if [ "${mem:-1}" = 0 ] && [ "${disk:-1}" = 0 ]; then break; fi
  sleep 0.5
done
echo "spool drained $((SECONDS - RESUMED)) s after the broker resumed"
wait $LT || true
kill $SAMPLER 2>/dev/null || true
curl -fs http://127.0.0.1:$AP/metrics | grep -E '^gateway_(frames_dropped_total|spool_(spilled|replayed|recovered)_records_total|spool_full_total|spool_disk_errors_total)' | grep -v ' 0$' || true
python3 - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(out + ".csv")))
rss = [int(float(r["rss_bytes"])) for r in rows if r["rss_bytes"]]
disk = [int(float(r["spool_disk_bytes"] or 0)) for r in rows]
print(f"gateway RSS max {max(rss)/2**20:.1f} MiB; disk tier max {max(disk)/2**20:.1f} MiB")
try:
    r = json.load(open(out + ".json"))
except Exception as e:
    print("no loadtest report:", e); sys.exit(0)
v = r.get("verification") or {}
t = v.get("total") or {}
print("verify total:", json.dumps(t))
print(f"streams {v.get('streams')} start events {v.get('start_events')} end events {v.get('end_events')}; "
      f"gateway published {v.get('gateway_frames_published')} dropped {v.get('gateway_frames_dropped')}")
PY
echo "files: $OUT.{csv,json,loadtest.log,gateway.log}"
kill $SAMPLER 2>/dev/null || true
cleanup
trap - EXIT
