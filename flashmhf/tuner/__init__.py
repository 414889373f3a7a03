"""Optuna search of kernel configs on the local GPU (or the CPU interpreter), written to the cache."""
