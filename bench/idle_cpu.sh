#!/usr/bin/env bash
# CPU an idle gateway spends per second, by thread group (no streams; fresh broker and gateway).
# An idle instance should cost next to nothing: this shows which thread wakes up anyway.
# Usage: bench/idle_cpu.sh [SECONDS=15] [gateway flags...]
#   e.g. bench/idle_cpu.sh 15 --kafka-drain-interval 5ms
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SECONDS_IDLE="${1:-15}"
shift || true
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29993; GP=28981; AP=29981
start_broker $BP
B=$!
target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
  --insecure-skip-signature --log-level warn --topic-prefix idle "$@" >/dev/null 2>&1 &
G=$!
trap 'kill -9 $G $B 2>/dev/null || true' EXIT
wait_ready $AP $G
sleep 3
# utime + stime (clock ticks) of every thread, summed per group (`ingest-1` → `ingest`).
snapshot() {
  for t in /proc/$G/task/*; do
    printf '%s %s\n' "$(sed -E 's/[-:]?[0-9]+$//' "$t/comm")" "$(cut -d')' -f2 "$t/stat" | awk '{print $12 + $13}')"
  done | awk '{s[$1] += $2} END {for (k in s) print k, s[k]}' | sort
}
A=$(snapshot)
W0=$(curl -fs "http://127.0.0.1:$AP/metrics" | awk '/^gateway_kafka_drain_iterations_total/ {print $2}')
sleep "$SECONDS_IDLE"
Z=$(snapshot)
W1=$(curl -fs "http://127.0.0.1:$AP/metrics" | awk '/^gateway_kafka_drain_iterations_total/ {print $2}')
TICK=$(getconf CLK_TCK)
echo "idle ${SECONDS_IDLE} s, CPU per second of wall time (ms/s), by thread group:"
join <(echo "$A") <(echo "$Z") | awk -v s="$SECONDS_IDLE" -v tick="$TICK" \
  '{d = ($3 - $2) * 1000 / tick / s; if (d > 0) printf "  %-22s %6.1f\n", $1, d}'
echo "drain wake-ups per second: $(awk -v a="${W0:-0}" -v b="${W1:-0}" -v s="$SECONDS_IDLE" 'BEGIN {printf "%.1f", (b - a) / s}')"
