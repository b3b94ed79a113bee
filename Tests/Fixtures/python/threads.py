"""Fixture: forward() raises unless the worker's thread variables are the ones MoECheck should have
set (MOECHECK_FIXTURE_EXPECT_THREADS), else the exact result."""
import os

import moecheck_adapter as mc

RECIPE = "exact"


def forward(layer, x):
    want = os.environ["MOECHECK_FIXTURE_EXPECT_THREADS"]
    got = {k: os.environ.get(k) for k in ("MOECHECK_WORKER_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    if any(v != want for v in got.values()):
        raise RuntimeError(f"thread variables {got}, expected {want}")
    r = mc.route(layer, x, logits="none", probabilities="none", weights="none", gate="none")
    return mc.moe_numpy(layer, x, r, intermediate="none", output="none")
