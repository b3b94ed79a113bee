"""Fixture: forward() raises."""
RECIPE = "exact"


def forward(layer, x):
    raise ValueError("boom from fixture")
