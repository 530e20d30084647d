"""Benchmarks: stock vs DyMU side by side in one process; the headline is the ratio."""
