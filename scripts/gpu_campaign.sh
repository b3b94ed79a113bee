#!/usr/bin/env bash
# The catalogue (`verify --suite all`) and a fuzz campaign against one kernel on a many-core GPU
# host, in parallel shards: the float64 reference is CPU work, and P processes with a few OpenBLAS
# threads each use a 16-core host far better than one process with 16 threads. Each shard has its
# own kernel instance (Python worker or library handle) on the same GPU.
#
# Usage: scripts/gpu_campaign.sh KERNEL OUTDIR [FUZZ_CASES] [FUZZ_SECONDS]
#   KERNEL        ADAPTER.py (a Python kernel adapter) or LIB.so (the C ABI); several adapters as
#                 A.py,B.py: the catalogue judges them together (one reference per case for the
#                 adapters of the same recipe), then each gets its own fuzz campaign
#   OUTDIR        logs and JSON of every shard: verify-<i>.{log,json}, fuzz-<i>.{log,json}
#   FUZZ_CASES    fuzz cases in all, split over the shards (default 2000; 0 skips fuzzing)
#   FUZZ_SECONDS  no shard starts a new fuzz case after this many seconds (default 400)
# Environment: MOECHECK (the binary; default .build/release/moecheck, else moecheck on PATH),
#   PROCS (shards, default nproc/2), THREADS (OpenBLAS threads per shard, default 2),
#   SEED (fuzz seed, default 1), SUITE (default all), EXTRA (more arguments for both commands),
#   FUZZ_EXTRA (more arguments for fuzz, e.g. --max-cost 1e8), VERIFY_SECONDS (a shard of the
#   catalogue is stopped after this long; default 3600), SHRINK_SECONDS (a fuzz shard is stopped
#   this long after FUZZ_SECONDS, shrinking included; default 60: a device call's deadline holds),
#   VERIFY (0 skips the catalogue; default 1).
# Prints each phase's totals (cases, passed, failed, wall time) and the first failure lines.
set -uo pipefail
kernel=${1:?usage: gpu_campaign.sh KERNEL OUTDIR [FUZZ_CASES] [FUZZ_SECONDS]}
out=${2:?usage: gpu_campaign.sh KERNEL OUTDIR [FUZZ_CASES] [FUZZ_SECONDS]}
fuzz_cases=${3:-2000}
fuzz_seconds=${4:-400}
bin=${MOECHECK:-}
if [ -z "$bin" ]; then
  if [ -x .build/release/moecheck ]; then bin=.build/release/moecheck; else bin=moecheck; fi
fi
procs=${PROCS:-$(( $(nproc) / 2 ))}; [ "$procs" -ge 1 ] || procs=1
threads=${THREADS:-2}
seed=${SEED:-1}
suite=${SUITE:-all}
mkdir -p "$out"
IFS=, read -r -a kernels <<< "$kernel"
sel=()
for k in "${kernels[@]}"; do
  case "$k" in
    *.py) sel+=(--python "$k") ;;
    *) sel+=(--kernels "$k") ;;
  esac
done
name=$(for k in "${kernels[@]}"; do basename "$k"; done | paste -sd+)
nk=${#kernels[@]}

totals() {  # phase: sums "N passed, M failed" over the shards' last count lines
  local phase=$1 p=0 f=0 n
  for ((i = 0; i < procs; i++)); do
    n=$(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$out/$phase-$i.log" | tail -1)
    if [ -z "$n" ]; then echo "  $phase shard $i: no summary line (see $out/$phase-$i.log):"; tail -3 "$out/$phase-$i.log" | sed 's/^/    /'; continue; fi
    grep -q '^verify: stopped by signal' "$out/$phase-$i.log" && echo "  $phase shard $i: stopped at the deadline; $n of the runs that finished:" && grep -E '^verify: (\[[0-9]+\] )?.* s \(' "$out/$phase-$i.log" | tail -"$nk" | cut -c1-400 | sed 's/^/    /'
    p=$((p + ${n%% passed*})); n=${n#*passed, }; f=$((f + ${n%% failed*}))
  done
  echo "$name $phase: $((p + f)) cases, $p passed, $f failed"
  grep -hE '^(\[[0-9]+\] )?FAIL' "$out"/$phase-*.log | head -5 | cut -c1-300 | sed 's/^/  /'
}

if [ "${VERIFY:-1}" != 0 ]; then
start=$(date +%s)
for ((i = 0; i < procs; i++)); do
  timeout "${VERIFY_SECONDS:-3600}" "$bin" verify "${sel[@]}" --suite "$suite" --shard "$i/$procs" --blas-threads "$threads" \
    --json "$out/verify-$i.json" ${EXTRA:-} > "$out/verify-$i.log" 2>&1 &
done
wait
echo "$name verify --suite $suite: $procs shards × $threads threads, $(( $(date +%s) - start )) s wall"
grep -h 'time split\|cases/s' "$out"/verify-*.log | head -"$procs" | sed 's/^/  /'
for ((i = 0; i < procs; i++)); do grep -h 'peak memory' "$out/verify-$i.log" | tail -1 | sed "s/^verify: /  shard $i: /"; done
totals verify
fi

if [ "$fuzz_cases" -gt 0 ]; then
  per=$(( (fuzz_cases + procs - 1) / procs ))
  for k in "${kernels[@]}"; do
    case "$k" in *.py) one=(--python "$k") ;; *) one=(--kernels "$k") ;; esac
    tag=fuzz; [ ${#kernels[@]} -gt 1 ] && tag=fuzz-$(basename "$k" .py)
    start=$(date +%s)
    for ((i = 0; i < procs; i++)); do
      timeout "$(( fuzz_seconds + ${SHRINK_SECONDS:-60} ))" "$bin" fuzz "${one[@]}" --seed "$seed" --shard "$i/$procs" --cases "$per" --seconds "$fuzz_seconds" \
        --blas-threads "$threads" --json "$out/$tag-$i.json" ${EXTRA:-} ${FUZZ_EXTRA:-} > "$out/$tag-$i.log" 2>&1 &
    done
    wait
    echo "$(basename "$k") fuzz seed $seed: $procs shards × ≤$per cases, $(( $(date +%s) - start )) s wall"
    name=$(basename "$k") totals "$tag"
  done
fi
