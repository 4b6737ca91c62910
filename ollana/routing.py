"""Where proxied requests go.

Server mode sends everything to the local Ollama, even while its monitor last found it
down, unless it hangs or answers wrongly (a refused connection costs microseconds, and an
Ollama that is back is used at once), and tells the monitor what requests find. Client
mode chooses servers from the pool by strategy and by the model a request names, counts
the requests each server has, reports the ones it cannot reach to the health checker, and
ejects servers that fail requests in a row. Both tell the requests waiting on an upstream
that was found down, so that they go elsewhere (or fail) at once.
"""

from __future__ import annotations

from ollana.health import LocalOllamaMonitor, PeerHealthChecker
from ollana.listings import MergedListings
from ollana.peers import Peer, PeerPool
from ollana.upstream import Listing, NoUpstream, Router, Upstream, Watcher

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})


class LocalRouter(Router):
    """Server mode: the local Ollama, unless its monitor has found it down."""

    def __init__(self, ollama_url: str, monitor: LocalOllamaMonitor) -> None:
        super().__init__(Upstream(ollama_url))
        self.monitor = monitor
        monitor.watch(lambda: None, lambda reason: self.found_down(ollama_url, reason))

    def candidates(self, model: str | None) -> list[Upstream]:
        if self.monitor.known_down and not self.monitor.cheap_to_try:
            raise NoUpstream(
                f"ollana: the Ollama behind this server ({self.monitor.url}) is down: "
                f"{self.monitor.reason}"
            )
        return super().candidates(model)

    def succeeded(self, upstream: Upstream) -> None:
        self.monitor.answered()

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.monitor.unreachable(reason)


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
        pool.watch_down(lambda peer, reason: self.found_down(peer, reason))

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return method in BODY_METHODS and not path.startswith(b"/api/blobs/")

    def listing(self, method: bytes, path: bytes) -> Listing | None:
        return self.listings.lookup(method, path)

    def candidates(self, model: str | None) -> list[Upstream]:
        peers = self.pool.candidates(self.strategy, model)[: self.attempts]
        if not peers:
            raise NoUpstream(self.pool.why_none())
        return [Upstream(peer.url, peer.address, peer) for peer in peers]

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        super().started(upstream, watcher)
        peer: Peer = upstream.server
        peer.active += 1
        peer.total_requests += 1

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        super().ended(upstream, watcher)
        peer: Peer = upstream.server
        peer.active -= 1

    def succeeded(self, upstream: Upstream) -> None:
        self.pool.request_succeeded(upstream.server)

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.checker.suspect(upstream.server, reason)
        self.pool.request_failed(upstream.server, reason)

    def errored(self, upstream: Upstream, reason: str) -> None:
        self.pool.request_failed(upstream.server, reason)
