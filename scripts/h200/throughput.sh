#!/usr/bin/env bash
# Issue 12's measurements in one call, one thing at a time on an otherwise idle host: the
# catalogue with an empty reference cache and again with it filled (one process, default
# threads), GPU fuzz at the default caps, and the oracle alone on the 397B-TP8 T 4096 BF16 case
# (`reference` with bounds; `judge` of its own output: bounds and statistics).
# Env: COLD (s, default 150), WARM (60), FUZZ (60), SEED (94), CACHE_MAX (40G).
. "$(dirname "$0")/common.sh"
make -C Kernels PLATFORM=nvidia IMPL=mma -j16 > "$LOG/build.log" 2>&1 || { tail -20 "$LOG/build.log"; exit 2; }
LIB=$PWD/Kernels/build/nvidia-mma/libmoekernels.so
CACHE=/tmp/moecheck-cache; rm -rf "$CACHE"
step() {  # name seconds args...
  local name=$1 secs=$2; shift 2
  local t0; t0=$(date +%s%N)
  timeout "$secs" "$B" "$@" > "$LOG/$name.log" 2>&1; local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '== %s (exit %s, %d.%03d s wall): moecheck %s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$*"
  grep -E 'OpenBLAS core|cases/s|time split|reference cache|passed, [0-9]+ failed|^fuzz:|^reference:|^FAIL' "$LOG/$name.log" | cut -c1-300 | tail -8
}
# the catalogue's references take many GB (a T = 4096 case's can exceed 1 GiB, half the default cap:
# not stored); the default 2 GiB cap evicted most before the warm run (2026-12-03 night: the
# 397B-TP8 cases took 8-16 s of reference again)
CAP=${CACHE_MAX:-40G}
step cold "${COLD:-150}" verify --kernels "$LIB" --suite all --cache "$CACHE" --cache-max-bytes "$CAP" --json "$LOG/cold.json"
step warm "${WARM:-60}" verify --kernels "$LIB" --suite all --cache "$CACHE" --cache-max-bytes "$CAP"
step fuzz "$(( ${FUZZ:-60} + 60 ))" fuzz --kernels "$LIB" --seed "${SEED:-94}" --seconds "${FUZZ:-60}" --cases 100000 --json "$LOG/fuzz.json"
mkdir -p /tmp/big
"$B" cases export --suite all --filter qwen3.5-397b-a17b-tp8-bf16-T4096 --out /tmp/big > "$LOG/export.log" 2>&1
F=/tmp/big/qwen3.5-397b-a17b-tp8-bf16-T4096.safetensors
step reference 120 reference --case "$F" --output /tmp/big/ref.safetensors
step judge 120 judge --case "$F" --output /tmp/big/ref.safetensors
MOECHECK_PROFILE=1 "$B" judge --case "$F" --output /tmp/big/ref.safetensors > "$LOG/judge-profile.log" 2>&1
grep 'profile:' "$LOG/judge-profile.log" | grep -v digest | cut -c1-120
