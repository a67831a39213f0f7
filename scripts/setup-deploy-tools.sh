#!/usr/bin/env bash
# Installs the tools that validate deploy/ (used by gateway/tests/deploy.rs). Idempotent and quiet
# when everything is present:
# - Debian package `prometheus`: `promtool` (config and rule checks) and the `prometheus` server
#   (the test scrapes a real gateway with it). The package's own service is not started here.
# - PyPI package `kubernetes-validate` (offline Kubernetes JSON schemas) into a project-local
#   virtualenv, .cache/deploy-venv (git-ignored); nothing is installed system-wide by pip.
# Prints the venv's bin directory on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.cache/deploy-venv"
KV_VERSION="1.37.0"
if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "setup-deploy-tools.sh: installing Debian package prometheus" >&2
  # Only refresh the package lists when apt does not know the package yet.
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    $SUDO apt-get update -qq
  fi
  # The package's postinst may try to start its service; policy-rc.d 101 forbids that where
  # no init system runs (containers, CI).
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
fi
command -v promtool >/dev/null 2>&1 || { echo "setup-deploy-tools.sh: promtool missing after install" >&2; exit 1; }

if [[ ! -x "$VENV/bin/kubernetes-validate" ]] \
  || ! "$VENV/bin/python" -c "import kubernetes_validate" >/dev/null 2>&1; then
  echo "setup-deploy-tools.sh: installing kubernetes-validate==$KV_VERSION into $VENV" >&2
  mkdir -p "$ROOT/.cache"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" >&2
fi
echo "$VENV/bin"
