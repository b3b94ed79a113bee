#!/usr/bin/env bash
# Which OpenBLAS core the carried libopenblas (Debian 0.3.21) picks on this host, and the
# reference's time on one catalogue case under that core and under forced ones (OPENBLAS_CORETYPE).
# Env: CASE (catalogue filter, default qwen3.5-397b-a17b-tp8-bf16-T256), CORES (forced cores),
# THREADS (OpenBLAS threads, 16).
. "$(dirname "$0")/common.sh"
grep -m1 'model name' /proc/cpuinfo; grep -o -m1 -w 'avx512f\|avx512_bf16\|amx_tile' /proc/cpuinfo | sort -u | paste -sd' '
make -C Kernels PLATFORM=nvidia IMPL=mma -j16 > "$LOG/build.log" 2>&1 || { tail -20 "$LOG/build.log"; exit 2; }
LIB=$PWD/Kernels/build/nvidia-mma/libmoekernels.so
for core in default ${CORES:-SkylakeX Haswell}; do
  for round in 1 2; do
    if [ "$core" = default ]; then unset OPENBLAS_CORETYPE; else export OPENBLAS_CORETYPE=$core; fi
    OPENBLAS_VERBOSE=2 "$B" verify --kernels "$LIB" --suite all --filter "${CASE:-qwen3.5-397b-a17b-tp8-bf16-T256}" --no-cache \
      --blas-threads "${THREADS:-16}" > "$LOG/blas-$core-$round.log" 2>&1
    echo "$core round $round: $(grep -m1 '^Core' "$LOG/blas-$core-$round.log") | $(grep -o 'reference [0-9.]* s' "$LOG/blas-$core-$round.log" | head -1) | $(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$LOG/blas-$core-$round.log" | tail -1)"
  done
done
unset OPENBLAS_CORETYPE
