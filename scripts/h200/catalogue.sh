#!/usr/bin/env bash
# One call: the catalogue (verify --suite all) against several kernels judged together (one
# reference per case for kernels of the same recipe), in PROCS shards × THREADS OpenBLAS threads.
# Env: KERNELS (comma-separated: adapters/X.py or "LIB" for the C ABI library built here with
# IMPL=mma), PROCS (8), THREADS (2), DEADLINE (seconds into the call when shards are stopped),
# BESIDE (moecheck argument lists run beside it, one per line; see common.sh), AFTER (argument
# lists run one by one after it until DEADLINE; @LIB@ = the library), PRE (likewise, before it,
# together stopped after PRE_SECS, default 200).
. "$(dirname "$0")/common.sh"
export MOECHECK_TORCH_STRICT=1
K=${KERNELS:?KERNELS}
if [[ ",$K," == *",LIB,"* ]]; then
  make -C Kernels PLATFORM=nvidia IMPL=mma -j16 > "$LOG/build.log" 2>&1 || { tail -20 "$LOG/build.log"; exit 2; }
  LIB=$PWD/Kernels/build/nvidia-mma/libmoekernels.so
  K=${K//LIB/$LIB}
fi
if [ -n "${PRE:-}" ]; then AFTER=$PRE DEADLINE=$(( $(date +%s) - T0 + ${PRE_SECS:-200} )) run_after; fi
start_beside $(( $(left) - 15 ))
VERIFY_SECONDS=$(( $(left) - 15 )) PROCS=${PROCS:-8} THREADS=${THREADS:-2} MOECHECK=$B \
  bash scripts/gpu_campaign.sh "$K" "$LOG" 0 2>&1 | tee "$LOG/summary.txt"
wait
# per kernel over every shard: passed, failed, skipped (contract), not judged (out of memory)
awk 'FNR == 1 { delete name } /^  \[[0-9]+\] .*: [0-9]+ cases/ { i = substr($1, 2, length($1) - 2); n = $0; sub(/^  \[[0-9]+\] /, "", n); sub(/: [0-9]+ cases.*/, "", n); name[i] = n; names[i] = n }
     /^\[[0-9]+\] (PASS|FAIL|SKIP) / { i = substr($1, 2, length($1) - 2); k = $2; if (k == "SKIP" && index($0, "not judged")) k = "NOT-JUDGED"; c[i, k]++ }
     END { for (i in names) printf "  [%s] %s: %d passed, %d failed, %d skipped, %d not judged\n", i, names[i], c[i, "PASS"], c[i, "FAIL"], c[i, "SKIP"], c[i, "NOT-JUDGED"] }' \
  "$LOG"/verify-*.log | sort | tee -a "$LOG/summary.txt"
report_beside
run_after
