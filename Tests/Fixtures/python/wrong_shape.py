"""Fixture: forward() returns [T, H+1]."""
import numpy as np

RECIPE = "exact"


def forward(layer, x):
    return np.zeros((x.shape[0], x.shape[1] + 1), np.float32)
