"""Fixture: defines RECIPE but no forward()."""
RECIPE = "exact"
