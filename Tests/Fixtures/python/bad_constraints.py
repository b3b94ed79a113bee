"""Fixture: a malformed CONSTRAINTS (multiple_of as a string): an error at hello naming the key."""
import moecheck_adapter as mc

RECIPE = "fused-bf16"
CONSTRAINTS = {"multiple_of": "8"}


def forward(layer, x):
    return mc.moe_numpy(layer, x, mc.route(layer, x), intermediate="bf16", output="bf16")
