#!/usr/bin/env bash
# Installs what the transcription example and its selftest need, idempotently:
#   - Debian packages espeak-ng and sox (test speech), via apt-get when missing (sudo if not
#     root), plus python3-venv when the interpreter cannot make a virtualenv;
#   - a project-local virtualenv in examples/transcribe/.venv with the exact pins of
#     requirements.txt (pip --no-deps: the file is the whole closure; `pip check` verifies it).
# Prints the virtualenv's python path on stdout on success; everything else goes to stderr.
# PYTHON=/path/to/python3 chooses the interpreter (default: python3 on PATH; needs >= 3.11).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv"
REQ="$HERE/requirements.txt"
PY="${PYTHON:-python3}"
say() { echo "setup.sh: $*" >&2; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  say "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  say "$PY is $("$PY" -V 2>&1); the pinned numpy needs Python >= 3.11"
  exit 1
}

# The stamp records the requirements and interpreter the venv was built from: same → done.
want="$(sha256sum "$REQ" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
stamp="$VENV/.installed"
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  say "virtualenv up to date ($VENV)"
else
  # Anything else (first run, changed pins or interpreter, an interrupted install): start clean.
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" >&2
  say "pip install -r requirements.txt (exact pins, --no-deps)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -r "$REQ" >&2
  "$VENV/bin/python" -m pip check --disable-pip-version-check >&2
  # Fail here, not at run time, if the model is not inside the package.
  "$VENV/bin/python" - >&2 <<'PY'
import os
from pocketsphinx import get_model_path
for p in ("en-us/en-us/mdef", "en-us/en-us/feat.params", "en-us/en-us.lm.bin",
          "en-us/cmudict-en-us.dict"):
    assert os.path.exists(get_model_path(p)), f"pocketsphinx model file missing: {p}"
import confluent_kafka, numpy
from importlib.metadata import version
print(f"setup.sh: pocketsphinx {version('pocketsphinx')} model OK; confluent-kafka "
      f"{version('confluent-kafka')} (librdkafka {confluent_kafka.libversion()[0]}); "
      f"numpy {numpy.__version__}")
PY
  echo "$want" >"$stamp"
fi
echo "$VENV/bin/python"
