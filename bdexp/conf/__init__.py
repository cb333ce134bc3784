"""Hydra config tree, shipped inside the package so `pip install .` finds it."""
