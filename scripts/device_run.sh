#!/usr/bin/env bash
# Runs MoECheck on a GPU machine that has no Swift: unpacks the static moecheck binary (with
# OpenBLAS's shared libraries) from .carry/moecheck.tar.xz, builds Kernels/ with nvcc, then runs
# the moecheck commands given as arguments (each a quoted string), logging under $OUT (or ./out).
#
#   scripts/pack_for_device.sh                 # on the build machine: .carry/moecheck.tar.xz
#   scripts/device_run.sh "verify --suite smoke" "verify --suite splitk"
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/moecheck
tar -C /tmp/moecheck -xJf .carry/moecheck.tar.xz || { echo "cannot unpack .carry/moecheck.tar.xz"; exit 2; }
export LD_LIBRARY_PATH=/tmp/moecheck${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvcc --version | tail -2
make -C Kernels PLATFORM=nvidia FAULTS=1 -j4 > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 2; }
export MOECHECK_KERNELS=$PWD/Kernels/build/nvidia/libmoekernels.so
FAULT_LIB=$PWD/Kernels/build/nvidia/libmoekernels_faults.so
export FAULT_LIB
rc=0
i=0
for cmd in "$@"; do
  i=$((i+1))
  cmd=${cmd//@FAULTS@/$FAULT_LIB}
  echo "=== moecheck $cmd"
  # shellcheck disable=SC2086
  /tmp/moecheck/moecheck $cmd 2>&1 | tee "$OUT/run$i.log" | grep -v '^PASS ' 
  r=${PIPESTATUS[0]}
  echo "=== exit $r"
  [ "$r" = 0 ] || rc=$r
done
exit $rc
