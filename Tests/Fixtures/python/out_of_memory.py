"""Fixture: forward() runs out of (GPU) memory the first MOECHECK_FIXTURE_OOM_TIMES times in this
worker, counted in the file MOECHECK_FIXTURE_MARKER, raising an exception named like torch's
OutOfMemoryError; afterwards the exact result."""
import os

import moecheck_adapter as mc

RECIPE = "exact"


class OutOfMemoryError(RuntimeError):
    pass


def forward(layer, x):
    marker = os.environ["MOECHECK_FIXTURE_MARKER"]
    times = int(os.environ.get("MOECHECK_FIXTURE_OOM_TIMES", "1"))
    seen = os.path.getsize(marker) if os.path.exists(marker) else 0
    if seen < times:
        with open(marker, "a") as f:
            f.write("x")
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fixture)")
    r = mc.route(layer, x, logits="none", probabilities="none", weights="none", gate="none")
    return mc.moe_numpy(layer, x, r, intermediate="none", output="none")
