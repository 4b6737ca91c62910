"""What the tests share; no test module imports another.

- ``fakes``: a fake datagram transport and a UDP-capable fake reactor, fake Ollama probes
  over simulated Ollamas, log capture.
- ``http``: upstream connections accepted one at a time in memory, a proxy site in front
  of them, readers of raw HTTP.
- ``memnet``: a LAN in memory (``twisted.test.iosim``): client and server nodes in front
  of simulated Ollamas, on one clock.
- ``processes``: child processes, free ports and deadlines for the loopback tests.
- ``netns`` and ``lan_driver``: a LAN of network namespaces, and requests made from
  inside one (``python -m tests.support.lan_driver``).
- ``fake_ollama``: the simulator under the tests' name (``python -m
  tests.support.fake_ollama``).
- ``strategies``: Hypothesis strategies for datagrams.
- ``garbage``: what a test leaves in reference cycles, for the cyclic collector.
"""
