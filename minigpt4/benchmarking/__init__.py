"""What scripts/benchmark.py and scripts/fullsize_check.py measure and how: the speed benchmark's model and presets
(speed_setup.py), its rows (speed_rows.py) and run and report (speed_run.py); measuring (measure.py), the timed
workloads (workloads.py), decode-time methods' costs (decoding_costs.py); the full-size check (fullsize*.py) with
the machine's limits (hardware.py) and the FLOP, byte and memory counts (costs.py)."""
