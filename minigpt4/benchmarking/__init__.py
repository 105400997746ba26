"""Pieces of scripts/benchmark.py: measuring (measure.py) and the timed workloads (workloads.py)."""
