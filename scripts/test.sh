#!/usr/bin/env bash
# Runs every test: formatting, clippy, unit, property and integration tests. Integration tests
# start their own Tansu broker processes and the real gateway binary (see
# gateway/tests/support). Set GATEWAY_TEST_BROKERS=host:port to use an existing broker instead.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
rustup component list --installed 2>/dev/null | grep -q rustfmt && cargo fmt --all -- --check
rustup component list --installed 2>/dev/null | grep -q clippy && cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
# The reference transcription pipeline end to end through the real gateway (issue 11):
# espeak-ng speech → Twilio simulator → gateway (16 kHz profile) → Kafka → pocketsphinx.
"$ROOT/examples/transcribe/gateway_e2e.sh"
