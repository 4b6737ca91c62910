"""Benchmarks of Ollana on loopback, each server a real process.

``python -m bench.run`` compares the proxy with nginx and Twisted's stock proxy (its
parts register themselves in bench.parts: bench.smallget, bench.streaming, bench.timings,
bench.routing); ``python -m bench.faults`` plays faults that should cost nothing;
``python -m bench.routing`` and ``python -m bench.timings`` run one part alone.
bench.harness starts, waits for and stops the processes of all of them.
"""
