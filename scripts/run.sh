#!/usr/bin/env bash
# The main job: a local Kafka-compatible broker (Tansu, in memory) plus the gateway, ready for
# Twilio streams on ws://0.0.0.0:8080/stream (metrics on :9090). Extra arguments go to the
# gateway, e.g. `scripts/run.sh --frames-per-record 5`. Ctrl-C stops both.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
BROKER_PORT="${BROKER_PORT:-9092}"
BROKER_PID=""
cleanup() { [[ -n "$BROKER_PID" ]] && kill "$BROKER_PID" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
if (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null; then
  echo "run.sh: a broker already listens on 127.0.0.1:$BROKER_PORT; using it" >&2
else
  TANSU="$("$ROOT/scripts/install-broker.sh")"
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine memory://tansu/ \
    >"$ROOT/.tansu/broker.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null && break
    sleep 0.1
  done
  echo "run.sh: Tansu broker on 127.0.0.1:$BROKER_PORT (in memory; log .tansu/broker.log)" >&2
fi
cargo build --release -p gateway
# Local runs accept unsigned streams; a --twilio-auth-token (or GATEWAY_TWILIO_AUTH_TOKEN) plus
# --public-url among the arguments turns signature checks on (a token overrides the flag).
exec_args=(--brokers "127.0.0.1:$BROKER_PORT" --create-topics --insecure-skip-signature)
# Tansu sleeps out a fetch's whole wait even when records are there, so against it the
# playback fetch wait is the playback latency floor: 5 ms here (the gateway's default, 100 ms,
# is for Apache Kafka, which answers a waiting fetch as soon as a record arrives; decision 47).
if [[ -z "${GATEWAY_PLAYBACK_FETCH_WAIT:-}" && " $* " != *" --playback-fetch-wait"* ]]; then
  exec_args+=(--playback-fetch-wait 5ms)
fi
exec_args+=("$@")
"$ROOT/target/release/gateway" "${exec_args[@]}" &
GW_PID=$!
trap 'kill -TERM $GW_PID 2>/dev/null; wait $GW_PID; cleanup' INT TERM
wait $GW_PID
