"""Fixture: the process exits (code 3) on its first forward() call, every time it is started."""
import os

RECIPE = "exact"
_calls = 0


def forward(layer, x):
    global _calls
    _calls += 1
    if _calls == 1:
        os._exit(3)
    raise AssertionError("unreachable")
