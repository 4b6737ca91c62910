"""Where proxied requests go.

Server mode sends everything to the local Ollama, and answers 503 while it is down.
Client mode chooses servers from the pool by strategy and by the model a request names,
counts the requests each server has, and reports the ones it cannot reach to the health
checker.
"""

from __future__ import annotations

from ollana.health import LocalOllamaMonitor, PeerHealthChecker
from ollana.listings import MergedListings
from ollana.peers import Peer, PeerPool
from ollana.upstream import Listing, NoUpstream, Router, Upstream

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})


class LocalRouter(Router):
    """Server mode: the local Ollama, unless its monitor has found it down."""

    def __init__(self, ollama_url: str, monitor: LocalOllamaMonitor) -> None:
        super().__init__(Upstream(ollama_url))
        self.monitor = monitor

    def candidates(self, model: str | None) -> list[Upstream]:
        if self.monitor.known_down:
            raise NoUpstream(
                f"ollana: the Ollama behind this server ({self.monitor.url}) is down: "
                f"{self.monitor.reason}"
            )
        return super().candidates(model)


class PoolRouter(Router):
    """Client mode: the pool's servers, best first, for the model a request names."""

    def __init__(
        self,
        pool: PeerPool,
        checker: PeerHealthChecker,
        listings: MergedListings,
        strategy: str = "fastest",
        attempts: int = 3,
        scan_limit: int = 8 << 20,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.checker = checker
        self.listings = listings
        self.strategy = strategy
        self.attempts = attempts
        self.scan_limit = scan_limit

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return method in BODY_METHODS and not path.startswith(b"/api/blobs/")

    def listing(self, method: bytes, path: bytes) -> Listing | None:
        return self.listings.lookup(method, path)

    def candidates(self, model: str | None) -> list[Upstream]:
        peers = self.pool.candidates(self.strategy, model)[: self.attempts]
        if not peers:
            raise NoUpstream(self.pool.why_none())
        return [Upstream(peer.url, peer.address, peer) for peer in peers]

    def started(self, upstream: Upstream) -> None:
        peer: Peer = upstream.server
        peer.active += 1
        peer.total_requests += 1

    def ended(self, upstream: Upstream) -> None:
        peer: Peer = upstream.server
        peer.active -= 1

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.checker.suspect(upstream.server, reason)
