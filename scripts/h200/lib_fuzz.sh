#!/usr/bin/env bash
# One call: builds Kernels/ (IMPL=mma, nvcc sm_90) and runs a fuzz campaign against the C ABI
# library in LIBSHARDS shards, beside ADAPTER's campaign in ASHARDS shards (MOECHECK_TORCH_STRICT=1).
# Env: SEED (91), SECS (330), LIBSHARDS (12), ADAPTER (hf_grouped_mm_bf16; "" for none), ASHARDS (4),
# MAXCOST (1e8), PRE (moecheck argument lists run first, one per line; @LIB@ = the library),
# BESIDE (moecheck argument lists run beside the campaigns, one per line, e.g. a sensitivity grid;
# @FAULTS@ = the FAULTS=1 build, built when named; each stopped after BESIDE_SECS, default SECS + 60).
. "$(dirname "$0")/common.sh"
export MOECHECK_TORCH_STRICT=1
SEED=${SEED:-91}; SECS=${SECS:-330}; LIBSHARDS=${LIBSHARDS:-12}; ASHARDS=${ASHARDS:-4}; MAXCOST=${MAXCOST:-1e8}
ADAPTER=${ADAPTER-hf_grouped_mm_bf16}
start=$(date +%s)
F=0; [[ "${PRE:-}${BESIDE:-}" == *@FAULTS@* ]] && F=1
[ -n "${LIB:-}" ] || make -C Kernels PLATFORM=nvidia IMPL=mma FAULTS=$F -j16 > "$LOG/build.log" 2>&1 || { tail -20 "$LOG/build.log"; exit 2; }
echo "Kernels IMPL=mma built in $(( $(date +%s) - start )) s"
LIB=${LIB:-$PWD/Kernels/build/nvidia-mma/libmoekernels.so}
FAULTLIB=$(dirname "$LIB")/libmoekernels_faults.so
n=0
while IFS= read -r cmd; do
  [ -n "$cmd" ] || continue
  n=$((n + 1)); cmd=$(expand "$cmd")
  echo "=== moecheck $cmd"
  # shellcheck disable=SC2086
  eval "\"\$B\" $cmd" > "$LOG/pre-$n.log" 2>&1; echo "=== exit $?"
  grep -E '^(PASS|FAIL)|passed, [0-9]+ failed' "$LOG/pre-$n.log" | cut -c1-300 | tail -4
done <<< "${PRE:-}"
start_beside $((SECS + 60))
run_fuzz() {  # tag shards kernel-args...
  local tag=$1 n=$2; shift 2
  for ((i = 0; i < n; i++)); do
    timeout $((SECS + 75)) "$B" fuzz "$@" --seed "$SEED" --shard "$i/$n" --cases 100000 --seconds "$SECS" \
      --max-cost "$MAXCOST" --blas-threads 1 --in-flight 2 --in-flight-memory 4G \
      --json "$LOG/$tag-$i.json" > "$LOG/$tag-$i.log" 2>&1 &
  done
}
run_fuzz lib "$LIBSHARDS" --kernels "$LIB"
[ -n "$ADAPTER" ] && run_fuzz "$ADAPTER" "$ASHARDS" --python "adapters/$ADAPTER.py"
wait
report_beside
for tag in lib $ADAPTER; do
  echo "== $tag (seed $SEED, ${SECS}s, max-cost $MAXCOST)"
  grep -hE '^[0-9]+ passed, [0-9]+ failed' "$LOG/$tag"-*.log | awk '{p+=$1; f+=$3} END {print "  " p " passed, " f " failed"}'
  grep -hE '^(\[[0-9]+\] )?FAIL|--replay' "$LOG/$tag"-*.log | head -8 | cut -c1-400
done
