#!/usr/bin/env bash
# Installs the Debian packages (and, for the tests, the Python packages) MoECheck needs, only
# where they are missing. Usage: scripts/ensure_packages.sh [--tests]
set -euo pipefail
need=()
for p in libopenblas-dev pkg-config; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ "${1:-}" = "--tests" ]; then
  for p in hipcc python3-pip; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" = "--tests" ]; then
  if ! python3 -c "import safetensors, ml_dtypes, numpy" 2>/dev/null; then
    echo "installing: python safetensors ml_dtypes numpy"
    python3 -m pip install -q safetensors ml_dtypes numpy 2>/dev/null \
      || python3 -m pip install -q --break-system-packages safetensors ml_dtypes numpy
  fi
fi
