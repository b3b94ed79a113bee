#!/usr/bin/env bash
# One call: the catalogue (verify --suite all) against several kernels judged together (one
# reference per case for kernels of the same recipe), in PROCS shards × THREADS OpenBLAS threads.
# Env: KERNELS (comma-separated: adapters/X.py or "LIB" for the C ABI library built here with
# IMPL=mma), PROCS (8), THREADS (2), DEADLINE (seconds into the call when shards are stopped),
# BESIDE (moecheck argument lists run beside it, one per line; see common.sh).
. "$(dirname "$0")/common.sh"
export MOECHECK_TORCH_STRICT=1
K=${KERNELS:?KERNELS}
if [[ ",$K," == *",LIB,"* ]]; then
  make -C Kernels PLATFORM=nvidia IMPL=mma -j16 > "$LOG/build.log" 2>&1 || { tail -20 "$LOG/build.log"; exit 2; }
  LIB=$PWD/Kernels/build/nvidia-mma/libmoekernels.so
  K=${K//LIB/$LIB}
fi
start_beside $(( $(left) - 15 ))
VERIFY_SECONDS=$(( $(left) - 15 )) PROCS=${PROCS:-8} THREADS=${THREADS:-2} MOECHECK=$B \
  bash scripts/gpu_campaign.sh "$K" "$LOG" 0 2>&1 | tee "$LOG/summary.txt"
wait
report_beside
