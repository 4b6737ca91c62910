"""The two helper servers of the benchmark, each run in its own process by bench.run.

``python -m bench.servers backend``
    The simulated Ollama (ollana.simulator.FakeOllama) without access log and without
    pacing: the fast backend every measurement ends at.
``python -m bench.servers streamer INTERVAL TOKENS``
    A backend for the streaming figures: every ``POST /api/generate`` is answered with
    TOKENS/2 to 3*TOKENS/2 NDJSON lines (at random), one every INTERVAL seconds, each
    carrying the time it was sent (``time.monotonic()``, one clock for all processes of
    the machine) so that the load generator can tell how long each line took to arrive.
    With ``slow`` in the query, 30 lines a second apart (streams held open). Every other
    request body (``POST /api/blobs/...``) is read and dropped, and answered 201.
``python -m bench.servers constant``
    Not a proxy: a twisted.web Site answering every GET with the same small JSON, without
    access log. The ceiling of any proxy built on twisted.web's server side, on the
    same machine.
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


def streamer(reactor: Any, interval: float, tokens: int) -> Any:
    """The streaming backend's site (see the module docstring)."""
    import io
    import json
    import random
    import time

    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site

    class Sink(Request):
        """Counts a request body instead of keeping it (a 1 GiB blob stays off disk)."""

        def gotLength(self, length: int | None) -> None:
            self.content = io.BytesIO()

        def handleContentChunk(self, data: bytes) -> None:
            pass

    class Generate(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            """What Ollana's health checks ask: the version and the models."""
            request.setHeader(b"content-type", b"application/json")
            if request.path == b"/api/tags":
                return b'{"models": [{"name": "bench:latest", "model": "bench:latest"}]}'
            return b'{"version": "0.12.0"}'

        def render_POST(self, request: Any) -> Any:
            # As Ollama's own server (Go sets TCP_NODELAY on every connection).
            request.transport.setTcpNoDelay(True)
            if not request.path.startswith(b"/api/generate"):
                request.setResponseCode(201)
                return b""
            request.setHeader(b"content-type", b"application/x-ndjson")
            slow = b"slow" in request.uri  # streams held open: a line a second, for 30 s
            # Streams of different lengths, as answers are: they do not all end at once.
            pace, count = (
                (1.0, 30) if slow else (interval, random.randint(tokens // 2, tokens * 3 // 2))
            )
            state: dict[str, Any] = {"left": count, "call": None}

            def send() -> None:
                state["left"] -= 1
                done = state["left"] <= 0
                line = {
                    "model": "bench",
                    "response": "token ",
                    "done": done,
                    "sent": time.monotonic(),
                }
                request.write(json.dumps(line).encode() + b"\n")
                if done:
                    state["call"] = None  # (a cycle through this function otherwise)
                    request.finish()
                else:
                    state["call"] = reactor.callLater(pace, send)

            def gone(_: object) -> None:
                call, state["call"] = state["call"], None
                if call is not None and call.active():
                    call.cancel()

            request.notifyFinish().addErrback(gone)
            # A random first delay spreads the streams' lines over the interval.
            state["call"] = reactor.callLater(random.uniform(0, pace), send)
            return NOT_DONE_YET

    class Quiet(Site):
        def log(self, request: Any) -> None:
            pass  # no access log: the backend is not what is measured

    site = Quiet(Generate())
    site.requestFactory = Sink
    return site


def constant() -> Any:
    """The twisted.web reference's site (see the module docstring)."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Version(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return b'{"version":"0.12.0"}\n'

    class Quiet(Site):
        def log(self, request: Any) -> None:
            pass

    return Quiet(Version())


def main(argv: list[str]) -> None:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    role = argv[0]
    if role == "backend":
        from ollana.simulator import FakeOllama

        fake = FakeOllama("0.12.0", ["llama3.2:latest", "echo:latest"], clock=reactor, record=False)
        site = fake.site(access_log=False)
    elif role == "streamer":
        site = streamer(reactor, float(argv[1]), int(argv[2]))
    elif role == "constant":
        site = constant()
    elif role == "stock":
        from twisted.logger import globalLogBeginner, textFileLogObserver
        from twisted.web.proxy import ReverseProxyResource
        from twisted.web.server import Site

        # Its errors on standard output (the run's stock.out), as twistd would log them.
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
        backend_port, logfile = int(argv[1]), argv[2]
        site = Site(ReverseProxyResource("127.0.0.1", backend_port, b""), logPath=logfile)
    else:
        raise SystemExit(f"unknown role {role!r}: backend, streamer, constant or stock")
    # The backends queue bursts (1,000 streams at once); the stock proxy keeps Twisted's 50.
    backlog = 50 if role == "stock" else 1024
    port = reactor.listenTCP(0, site, backlog=backlog, interface="127.0.0.1")
    print(f"port {port.getHost().port}", flush=True)
    if role in ("backend", "streamer"):
        # A backend's pauses would count as the proxies' delay: what start-up made is kept
        # out of the cyclic collector's passes (as ollana.tap does for a node).
        import gc

        gc.freeze()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
