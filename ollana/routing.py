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

import random
from collections.abc import Sequence

from twisted.web.http_headers import Headers

from ollana.affinity import wants_key
from ollana.health import LocalOllamaMonitor, PeerHealthChecker
from ollana.listings import MergedListings
from ollana.load import OllamaLoad
from ollana.peers import Peer, PeerPool, model_key
from ollana.proxy import QUEUE_HEADER
from ollana.state import STATE_HEADER, decode
from ollana.strategy import DEFAULT, WARM_ROUTES, LeastWait
from ollana.strategy import strategy as make_strategy
from ollana.upstream import Listing, NoUpstream, Router, Upstream, Watcher

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
SERVER_SCAN_LIMIT = 64 * 1024  # bytes a server reads for a request's model (its load report)


class LocalRouter(Router):
    """Server mode: the local Ollama, unless its monitor has found it hung or broken; with
    a load tracker, each request's model is counted and every answer carries the report."""

    def __init__(
        self, ollama_url: str, monitor: LocalOllamaMonitor, load: OllamaLoad | None = None
    ) -> None:
        super().__init__(Upstream(ollama_url))
        self.monitor = monitor
        self.load = load
        self.scan_limit = SERVER_SCAN_LIMIT if load is not None else 0
        self._answered: set[Watcher] = set()
        monitor.watch(lambda: None, lambda reason: self.found_down(ollama_url, reason))

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return self.load is not None and names_model(method, path)

    def admits(self, model: str | None, headers: Headers) -> bool:
        elsewhere = headers.getRawHeaders(QUEUE_HEADER) == [b"elsewhere"]
        return not (elsewhere and model and self.load is not None and self.load.would_queue(model))

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        if self.monitor.known_down and not self.monitor.cheap_to_try:
            raise NoUpstream(
                f"ollana: the Ollama behind this server ({self.monitor.url}) is down: "
                f"{self.monitor.reason}"
            )
        return super().candidates(model)

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        super().started(upstream, watcher)
        if self.load is not None:
            self.load.started(upstream.model)

    def answered(self, upstream: Upstream, watcher: Watcher, headers: Headers) -> None:
        if self.load is not None:
            self._answered.add(watcher)
            self.load.answered(upstream.model)

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        super().ended(upstream, watcher)
        if self.load is not None:
            answered = watcher in self._answered
            self._answered.discard(watcher)
            self.load.ended(upstream.model, answered)

    def response_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return ((STATE_HEADER, self.load.header()),) if self.load is not None else ()

    def succeeded(self, upstream: Upstream) -> None:
        self.monitor.answered()

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.monitor.unreachable(reason)


class PoolRouter(Router):
    """Client mode: the pool's servers, best first by the strategy, for the model (and the
    conversation) a request names; it reads the servers' state reports as they come."""

    def __init__(
        self,
        pool: PeerPool,
        checker: PeerHealthChecker,
        listings: MergedListings,
        strategy: str = DEFAULT,
        attempts: int = 3,
        scan_limit: int = 8 << 20,
        secret: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.checker = checker
        self.listings = listings
        self.strategy = make_strategy(pool, strategy, rng)
        self.attempts = attempts
        self.scan_limit = scan_limit
        self.secret = secret
        pool.watch_down(lambda peer, reason: self.found_down(peer, reason))

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return names_model(method, path)

    def wants_key(self, method: bytes, path: bytes) -> bool:
        return method == b"POST" and wants_key(path) and isinstance(self.strategy, LeastWait)

    def listing(self, method: bytes, path: bytes) -> Listing | None:
        return self.listings.lookup(method, path)

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        wanted = model_key(model) if model is not None else None
        choices = self.strategy.order(wanted, key)[: self.attempts]
        if not choices:
            raise NoUpstream(self.pool.why_none())
        return [Upstream(peer.url, peer.address, peer, model, key, reason)
                for peer, reason in choices]  # fmt: skip

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        super().started(upstream, watcher)
        peer: Peer = upstream.server
        peer.active += 1
        peer.unreported += 1
        if upstream.model is not None:
            model = model_key(upstream.model)
            peer.unreported_models[model] = peer.unreported_models.get(model, 0) + 1
        peer.total_requests += 1

    def answered(self, upstream: Upstream, watcher: Watcher, headers: Headers) -> None:
        self.reported(upstream.server, headers)

    def reported(self, peer: Peer, headers: Headers) -> None:
        take_report(peer, headers, self.secret)

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        super().ended(upstream, watcher)
        peer: Peer = upstream.server
        peer.active -= 1

    def succeeded(self, upstream: Upstream) -> None:
        self.pool.request_succeeded(upstream.server)
        self.strategy.served(upstream.server, upstream.model, upstream.key)

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.checker.suspect(upstream.server, reason)
        self.pool.request_failed(upstream.server, reason)

    def errored(self, upstream: Upstream, reason: str) -> None:
        self.pool.request_failed(upstream.server, reason)

    def warm(self, upstream: Upstream) -> bool:
        return upstream.model is not None and upstream.route in WARM_ROUTES

    def lists(self, upstream: Upstream, model: str) -> bool:
        return model_key(model) in upstream.server.models


def take_report(peer: Peer, headers: Headers, secret: bytes | None) -> None:
    """Take in the state report an answer from peer carries, if it has a good one."""
    values = headers.getRawHeaders(STATE_HEADER)
    state = decode(values[-1], secret) if values else None
    if state is not None:
        peer.state = state
        peer.unreported = 0
        peer.unreported_models = {}


def names_model(method: bytes, path: bytes) -> bool:
    """Whether the request's body may name the model it is for (not a blob's upload)."""
    return method in BODY_METHODS and not path.startswith(b"/api/blobs/")
