"""A small HTTP/1.1 keep-alive load generator in Twisted: the fallback when wrk is missing.

``python -m bench.loadgen URL CONNECTIONS SECONDS`` keeps CONNECTIONS connections busy
with GET URL (one request at a time on each, as wrk does) for SECONDS and prints one JSON
line: requests, errors, non-2xx answers, requests/s and latency p50/p99 in seconds.

It is much slower than wrk (it is Python, on the same CPUs as what it measures), so its
figures are a floor, good for comparing targets with each other, not for absolute rates.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import protocol


class Worker(protocol.Protocol):
    """One connection: sends a request, waits for the whole answer, sends the next."""

    transport: Any

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = b""
        self.sent = 0.0

    def connectionMade(self) -> None:
        self.send()

    def send(self) -> None:
        if time.perf_counter() >= self.run.deadline:
            self.transport.loseConnection()
            return
        self.buffer = b""
        self.sent = time.perf_counter()
        self.transport.write(self.run.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, found, body = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(b":") for line in lines[1:])}  # fmt: skip
        if b"content-length" in headers:
            if len(body) < int(headers[b"content-length"]):
                return
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            if not body.endswith(b"0\r\n\r\n"):
                return
        self.run.done(time.perf_counter() - self.sent, lines[0].split(b" ")[1])
        self.send()

    def connectionLost(self, reason: Any = None) -> None:
        self.run.closed(self)


class Run:
    def __init__(self, reactor: Any, url: str, connections: int, seconds: float) -> None:
        parts = urlsplit(url)
        self.reactor = reactor
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                        "Accept: */*\r\n\r\n").encode()  # fmt: skip
        self.connections = connections
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0
        self.open = 0
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def begin(self) -> None:
        factory = protocol.Factory.forProtocol(lambda: Worker(self))
        for _ in range(self.connections):
            self.open += 1
            endpoint = f"tcp:{self.host}:{self.port}"
            from twisted.internet.endpoints import clientFromString

            d = clientFromString(self.reactor, endpoint).connect(factory)
            d.addErrback(self.failed)

    def failed(self, _: Any) -> None:
        self.errors += 1
        self.open -= 1
        self.maybe_stop()

    def done(self, latency: float, status: bytes) -> None:
        self.latencies.append(latency)
        if not status.startswith(b"2"):
            self.non_2xx += 1

    def closed(self, worker: Worker) -> None:
        self.open -= 1
        self.maybe_stop()

    def maybe_stop(self) -> None:
        if self.open == 0:
            self.reactor.stop()

    def report(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        ordered = sorted(self.latencies) or [float("nan")]

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

        return {"requests": len(self.latencies), "errors": self.errors, "non_2xx": self.non_2xx,
                "rps": len(self.latencies) / elapsed, "p50": pct(50), "p99": pct(99)}  # fmt: skip


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    url, connections, seconds = argv[0], int(argv[1]), float(argv[2])
    run = Run(reactor, url, connections, seconds)
    reactor.callWhenRunning(run.begin)
    reactor.run()
    print(json.dumps(run.report()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
