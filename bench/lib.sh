# Shared by the bench/*.sh scripts (sourced, not run): one way to prepare the binaries, start
# the local broker and wait for a gateway, so a fix to any of them reaches every benchmark.

# Set-up, release build of the gateway and the harness, and TANSU = the broker binary.
bench_prepare() {
  "$ROOT/scripts/setup.sh" >/dev/null
  cargo build --release -p gateway -p loadtest 2>/dev/null
  TANSU="$("$ROOT/scripts/install-broker.sh")"
}

# Starts a fresh in-memory broker on 127.0.0.1:$1 in the background; its pid is in $!.
# Callers keep the pid (`start_broker P; B=$!`) and kill it with -9 on exit.
start_broker() {
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$1" --advertised-listener-url "tcp://127.0.0.1:$1" \
    --storage-engine memory://tansu/ >/dev/null 2>&1 &
  sleep 1
}

# Waits until the gateway with admin port $1 answers /readyz. Fails (exit 1) if process $2 is
# gone or 60 s pass: a gateway that could not start (port taken, bad flag) must not hang the
# benchmark.
wait_ready() {
  local deadline=$((SECONDS + 60))
  until curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$2" 2>/dev/null || ((SECONDS >= deadline)); then
      echo "gateway (pid $2, admin port $1) did not become ready" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# The playback fetch wait scripts/run.sh sets for Tansu, which sleeps out every fetch's wait
# (decision 47), unless the caller's gateway flags ($1) choose one.
tansu_fetch_wait() {
  [[ "${1:-}" == *--playback-fetch-wait* ]] || echo "--playback-fetch-wait 5ms"
}
