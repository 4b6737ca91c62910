"""Benchmarks of Ollana's proxy on loopback: see bench/run.py (``python -m bench.run``);
what faults cost: bench/faults.py (``python -m bench.faults``)."""
