"""Fixture: forward() returns an integer array of the right shape."""
import numpy as np

RECIPE = "exact"


def forward(layer, x):
    return np.zeros(x.shape, np.int32)
