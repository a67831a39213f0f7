#!/usr/bin/env bash
# CPU per media message with the spool's disk tier on vs off, healthy broker, same load,
# alternating runs (off, on, off, on, ...) so drift hits both alike.
# Usage: bench/spool_cpu.sh [STREAMS=300] [SECS=40] [ROUNDS=3]
# Gateway CPU is read from /proc/<pid>/stat (utime+stime) over the steady part of each run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STREAMS="${1:-300}"
SECS="${2:-40}"
ROUNDS="${3:-3}"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_prepare
BP=29592; GP=28580; AP=29580
TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # $1 = on|off; prints µs of gateway CPU per media message
  local spool=() dir=""
  if [ "$1" = on ]; then dir="$(mktemp -d /tmp/gw-spoolcpu.XXXXXX)"; spool=(--spool-dir "$dir"); fi
  start_broker $BP
  local broker=$!
  target/release/gateway --listen 127.0.0.1:$GP --admin-listen 127.0.0.1:$AP --brokers 127.0.0.1:$BP \
    --insecure-skip-signature --log-level warn "${spool[@]}" >/dev/null 2>&1 &
  local gw=$!
  wait_ready $AP $gw
  target/release/loadtest steady --url ws://127.0.0.1:$GP/stream --streams "$STREAMS" --duration "$SECS" \
    --tracks both --ramp-per-sec 200 --audio ../shared/fixtures/speech-8k.ulaw --quiet >/dev/null 2>&1 &
  local lt=$!
  # Measure the middle of the run: after the ramp, before the end.
  sleep 5
  local c0 m0 c1 m1
  c0=$(cpu_ticks $gw)
  m0=$(curl -fs http://127.0.0.1:$AP/metrics | awk '$1=="gateway_frames_received_total" {print $2}')
  sleep $((SECS - 10))
  c1=$(cpu_ticks $gw)
  m1=$(curl -fs http://127.0.0.1:$AP/metrics | awk '$1=="gateway_frames_received_total" {print $2}')
  wait $lt || true
  local spilled
  spilled=$(curl -fs http://127.0.0.1:$AP/metrics | awk '$1=="gateway_spool_spilled_records_total" {print $2}')
  kill $gw $broker 2>/dev/null; wait $gw $broker 2>/dev/null || true
  [ -n "$dir" ] && rm -rf "$dir"
  python3 -c "import sys; c=($c1-$c0)/$TICK; m=$m1-$m0; print(f'$1 {c*1e6/m:.2f} us/msg ({m:.0f} msgs, {c:.1f} s CPU, spilled ${spilled:-0})')"
}
for r in $(seq "$ROUNDS"); do
  run off
  run on
done
