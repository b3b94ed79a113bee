"""Fixture: exits (code 3) on forward() unless the marker file named by MOECHECK_FIXTURE_MARKER
exists; creates it first, so a restarted worker succeeds (exact result)."""
import os

import moecheck_adapter as mc

RECIPE = "exact"


def forward(layer, x):
    marker = os.environ.get("MOECHECK_FIXTURE_MARKER")
    if not marker:
        raise RuntimeError("dies_once fixture needs MOECHECK_FIXTURE_MARKER")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    r = mc.route(layer, x, logits="none", probabilities="none", weights="none", gate="none")
    return mc.moe_numpy(layer, x, r, intermediate="none", output="none")
