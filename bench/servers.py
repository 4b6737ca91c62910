"""The two helper servers of the benchmark, each run in its own process by bench.run.

``python -m bench.servers backend``
    The simulated Ollama (ollana.simulator.FakeOllama) without access log and without
    pacing: the fast backend every measurement ends at.
``python -m bench.servers stock BACKEND_PORT LOGFILE``
    Twisted's stock ``twisted.web.proxy.ReverseProxyResource`` in front of the backend,
    writing its access log (Twisted's combined log format) to LOGFILE, as Ollana writes
    its own access lines to its log file.

Both listen on 127.0.0.1 on a port the system picks, print ``port N`` on standard
output once listening, and run until SIGTERM or SIGINT.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str]) -> None:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    role = argv[0]
    if role == "backend":
        from ollana.simulator import FakeOllama

        fake = FakeOllama("0.12.0", ["llama3.2:latest", "echo:latest"], clock=reactor,
                          record=False)  # fmt: skip
        site = fake.site(access_log=False)
    elif role == "stock":
        from twisted.web.proxy import ReverseProxyResource
        from twisted.web.server import Site

        backend_port, logfile = int(argv[1]), argv[2]
        site = Site(ReverseProxyResource("127.0.0.1", backend_port, b""), logPath=logfile)
    else:
        raise SystemExit(f"unknown role {role!r}: backend or stock")
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(f"port {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
