#!/usr/bin/env bash
# The main job (README): installs what is missing, builds moecheck in release, checks the CPU
# reference against the committed golden tensors and, when a kernel library is given
# (MOECHECK_KERNELS=path/to/libmoekernels.so) or one can be built for a GPU found here, runs the
# verification catalogue on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure_packages.sh
swift build -c release
bin=.build/release/moecheck
echo "== moecheck goldens verify Goldens"
"$bin" goldens verify Goldens
if [ -z "${MOECHECK_KERNELS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then
    make -C Kernels PLATFORM=nvidia && export MOECHECK_KERNELS=$PWD/Kernels/build/nvidia/libmoekernels.so
  elif [ -e /dev/kfd ] && command -v hipcc >/dev/null 2>&1; then
    make -C Kernels PLATFORM=amd && export MOECHECK_KERNELS=$PWD/Kernels/build/amd/libmoekernels.so
  fi
fi
if [ -n "${MOECHECK_KERNELS:-}" ]; then
  echo "== moecheck verify --kernels $MOECHECK_KERNELS"
  "$bin" verify --kernels "$MOECHECK_KERNELS" --suite "${MOECHECK_SUITE:-catalogue}"
else
  echo "No GPU here: the GPU comparison was skipped. To run it, build the kernels on a GPU machine"
  echo "(make -C Kernels PLATFORM=nvidia, or PLATFORM=amd) and run"
  echo "  MOECHECK_KERNELS=Kernels/build/nvidia/libmoekernels.so scripts/main.sh"
  echo "or, on a GPU machine without Swift, see README 'GPU machines without Swift'."
fi
