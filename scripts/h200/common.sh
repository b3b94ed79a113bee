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
# the HF kernel hub's finegrained-fp8 source, where carried (adapters/hf_finegrained_fp8.py)
[ -d .carry/finegrained-fp8 ] && export MOECHECK_FINEGRAINED_FP8_SRC=$PWD/.carry/finegrained-fp8
T0=$(date +%s)
# seconds left before DEADLINE (seconds after the start of the call; default 540)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc;
  python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'; } 2>&1 | tee "$LOG/host.txt"

# BESIDE: moecheck argument lists, one per line, run in the background beside a campaign (`expand`:
# @LIB@ and @FAULTS@ replaced by $LIB and $FAULTLIB; $LOG may be named); each stopped after BESIDE_SECS.
expand() { local c=${1//@LIB@/${LIB:-}}; printf '%s\n' "${c//@FAULTS@/${FAULTLIB:-}}"; }
nb=0
start_beside() {  # default timeout
  local cmd
  while IFS= read -r cmd; do
    [ -n "$cmd" ] || continue
    nb=$((nb + 1)); cmd=$(expand "$cmd")
    echo "$cmd" > "$LOG/beside-$nb.cmd"
    # shellcheck disable=SC2086
    eval "timeout ${BESIDE_SECS:-$1} \"\$B\" $cmd" > "$LOG/beside-$nb.log" 2>&1 &
  done <<< "${BESIDE:-}"
}
# AFTER: moecheck argument lists, one per line, run one after another once the campaign is done,
# each stopped at the call's DEADLINE (`left`); logs $LOG/after-N.log, summary lines printed.
run_after() {
  local cmd n=0
  while IFS= read -r cmd; do
    [ -n "$cmd" ] || continue
    n=$((n + 1)); cmd=$(expand "$cmd")
    [ "$(left)" -gt 20 ] || { echo "=== after: not run (deadline): moecheck $cmd"; continue; }
    echo "=== after: moecheck $cmd (${SECONDS}s into the script, $(left) s left)"
    # shellcheck disable=SC2086
    eval "timeout $(left) \"\$B\" $cmd" > "$LOG/after-$n.log" 2>&1; echo "=== exit $?"
    grep -E '^(PASS|FAIL|SKIP)|passed, [0-9]+ failed|as expected|^sensitivity|rows' "$LOG/after-$n.log" | cut -c1-300 | tail -12
  done <<< "${AFTER:-}"
}
report_beside() {
  local i
  for ((i = 1; i <= nb; i++)); do echo "=== beside: moecheck $(cat "$LOG/beside-$i.cmd")"; tail -30 "$LOG/beside-$i.log" | cut -c1-250; done
}
