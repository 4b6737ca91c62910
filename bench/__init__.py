"""Benchmarks of Ollana's proxy on loopback: see bench/run.py (``python -m bench.run``)."""
