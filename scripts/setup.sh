#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine of this project's kind:
# a C toolchain, make, perl, python3 (librdkafka's bundled build), zlib and OpenSSL headers,
# pkg-config, and the Tansu broker. Idempotent and quiet when everything is present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v make >/dev/null 2>&1 || need+=(make)
command -v perl >/dev/null 2>&1 || need+=(perl)
command -v curl >/dev/null 2>&1 || need+=(curl)
[[ -e /usr/include/zlib.h ]] || need+=(zlib1g-dev)
# librdkafka is built with TLS (security.protocol=ssl/sasl_ssl, SASL/SCRAM) against OpenSSL.
[[ -e /usr/include/openssl/ssl.h ]] || need+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if ((${#need[@]})); then
  echo "setup.sh: installing ${need[*]}" >&2
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup.sh: cargo (rustup) is required" >&2; exit 1; }
"$ROOT/scripts/install-broker.sh" >/dev/null
