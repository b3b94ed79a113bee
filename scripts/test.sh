#!/usr/bin/env bash
# The test command (README; .ci/run calls it): installs what is missing, compiles the AMD kernel
# builds (hipcc, gfx90a + gfx940; the FMA and the matrix-core IMPL), checks the C header, the MFMA instructions of the AMD
# build and the matrix-core fragment layouts, runs the CI fuzz self-check and the CPU
# fault matrix, then the Swift test suites in release. Ends with the test runner's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure_packages.sh --tests
export MOECHECK_BLAS_THREADS=${MOECHECK_BLAS_THREADS:-2}
echo "== kernels: C99 header check and AMD build (compiled only: no AMD GPU here)"
make -C Kernels header-check
make -C Kernels PLATFORM=amd FAULTS=1 -j2
make -C Kernels PLATFORM=amd IMPL=mma FAULTS=1 -j2
echo "== kernels: the MFMA instructions in the AMD build (gfx90a bf16; gfx940 bf16 + fp8) and the matrix-core fragment layouts (numpy)"
make -C Kernels mfma-check
make -C Kernels layout-check
echo "== swift build (release)"
swift build -c release
echo "== fuzz: float32 reference against the float64 oracle's bounds"
.build/release/moecheck fuzz --cpu-selfcheck --seconds 20 --seed 7
echo "== faults: CPU fault models against the verifier"
.build/release/moecheck faults --cpu-models
echo "== goldens: regenerate and compare the committed golden tensors"
.build/release/moecheck goldens verify Goldens
echo "== python: worker protocol, helper and bad-adapter paths (NumPy adapters; no torch needed)"
python3 python/tests/test_worker.py
echo "== swift test (release)"
swift test -c release
