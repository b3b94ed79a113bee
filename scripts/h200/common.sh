#!/usr/bin/env bash
# Shared set-up of the H200 campaign calls (sourced): unpacks the static moecheck from
# .carry/moecheck.tar.xz, sets $B (the binary), $LOG (logs, packed into $OUT/logs.tgz on exit:
# a device call returns only a few files) and a deadline helper. Run from the repository root.
set -uo pipefail
OUT=${OUT:-$PWD/out}
LOG=$OUT/logs
mkdir -p "$LOG" /tmp/moecheck
trap 'tar -C "$OUT" -czf "$OUT/logs.tgz" logs 2>/dev/null' EXIT
tar -C /tmp/moecheck -xJf .carry/moecheck.tar.xz || { echo "cannot unpack .carry/moecheck.tar.xz"; exit 2; }
export LD_LIBRARY_PATH=/tmp/moecheck${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
B=/tmp/moecheck/moecheck
T0=$(date +%s)
# seconds left before DEADLINE (seconds after the start of the call; default 540)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc;
  python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'; } 2>&1 | tee "$LOG/host.txt"
