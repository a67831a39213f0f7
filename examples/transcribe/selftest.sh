#!/usr/bin/env bash
# Self-contained check of the transcription example, no gateway needed: installs what it needs
# (setup.sh, the repository's Tansu broker), synthesises speech with known transcripts, starts
# a local broker on a free port, publishes the speech in the gateway's Kafka contract (wb16
# profile at 16 kHz and the default 8 kHz topics), runs transcribe.py on each and prints both
# word error rates. The unit tests (test_transcribe.py) run first. Output and logs go to
# examples/transcribe/.selftest/; extra arguments go to selftest.py (e.g. --skip-edge).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$("$HERE/setup.sh")"
TANSU="$("$ROOT/scripts/install-broker.sh")"
echo "selftest.sh: unit tests (test_transcribe.py)" >&2
(cd "$HERE" && "$PY" -m unittest test_transcribe)
exec "$PY" "$HERE/selftest.py" --tansu "$TANSU" "$@"
