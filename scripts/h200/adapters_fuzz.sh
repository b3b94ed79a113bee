#!/usr/bin/env bash
# One call: a fuzz campaign against each torch/HF adapter at once, MOECHECK_TORCH_STRICT=1.
# Env: SEED (default 81), SECS (seconds of new cases, default 380), SHARDS per adapter (3),
# ADAPTERS (space-separated basenames), MAXCOST (default 1e8).
. "$(dirname "$0")/common.sh"
export MOECHECK_TORCH_STRICT=1
SEED=${SEED:-81}; SECS=${SECS:-380}; SHARDS=${SHARDS:-3}; MAXCOST=${MAXCOST:-1e8}
ADAPTERS=${ADAPTERS:-hf_eager_bf16 hf_batched_mm_bf16 hf_grouped_mm_bf16 torch_fused_bf16 torch_fused_fp8}
for a in $ADAPTERS; do
  for ((i = 0; i < SHARDS; i++)); do
    timeout $((SECS + 75)) "$B" fuzz --python "adapters/$a.py" --seed "$SEED" --shard "$i/$SHARDS" --cases 100000 \
      --seconds "$SECS" --max-cost "$MAXCOST" --blas-threads 1 --in-flight 2 --in-flight-memory 4G \
      --json "$LOG/$a-$i.json" > "$LOG/$a-$i.log" 2>&1 &
  done
done
wait
for a in $ADAPTERS; do
  echo "== $a (seed $SEED, $SHARDS shards, ${SECS}s, max-cost $MAXCOST)"
  for ((i = 0; i < SHARDS; i++)); do grep -E '[0-9]+ passed, [0-9]+ failed' "$LOG/$a-$i.log" | tail -1 | sed "s/^/  shard $i: /"; done
  grep -hE '^(\[[0-9]+\] )?FAIL|^  replay|moecheck fuzz .*--replay' "$LOG/$a"-*.log | head -8 | cut -c1-400
done
