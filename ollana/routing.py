"""Where proxied requests go.

Server mode sends everything to the local Ollama, even while its monitor last found it
down, unless it hangs or answers wrongly (a refused connection costs microseconds, and an
Ollama that is back is used at once), and tells the monitor what requests find. Client
mode chooses servers from the pool by strategy and by the model a request names, counts
the requests each server has, reports the ones it cannot reach to the health checker, and
ejects servers that fail requests in a row. Both tell the requests waiting on an upstream
that was found down, so that they go elsewhere (or fail) at once.

Client mode routes model management by what each request is (see "Model management through
a client" in the README): a blob to the server it was pushed to, a create to the server
holding its blobs, a pull by the strategy (or to all servers, or a chosen one), a delete or
copy to every server that has the model (answered here, as one Ollama would). Requests that
name no model go to the first healthy server in the order of their addresses: a stable
choice, so that what one request does there the next one finds.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from functools import partial

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ollana.affinity import wants_key
from ollana.health import LocalOllamaMonitor, PeerHealthChecker
from ollana.listings import MergedListings
from ollana.load import OllamaLoad
from ollana.management import (
    BlobHomes,
    create_digests,
    digest_of,
    merged_answer,
    named_model,
    not_found_note,
    request_json,
)
from ollana.messages import BadTarget
from ollana.peers import Peer, PeerPool, model_key
from ollana.state import STATE_HEADER, decode
from ollana.strategy import DEFAULT, WARM_ROUTES, LeastWait
from ollana.strategy import strategy as make_strategy
from ollana.upstream import (
    AT_ONCE,
    QUEUE_HEADER,
    WITH_BODY,
    Listing,
    LocalAnswer,
    NoUpstream,
    Plan,
    Router,
    Sender,
    Sent,
    Upstream,
    Watcher,
)

log = Logger()

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
SERVER_SCAN_LIMIT = 64 * 1024  # bytes a server reads for a request's model (its load report)
BLOBS = b"/api/blobs/"
MANAGED = frozenset({b"/api/create", b"/api/pull", b"/api/copy", b"/api/delete"})
SERVER_HEADER = b"x-ollana-server"  # HOST:PORT: a management request goes to that server only
SERVERS_HEADER = b"x-ollana-servers"  # "all": a pull goes to every server
DEFAULT_ROUTE = "default"  # X-Ollana-Route of a request that names no model
Choice = tuple[Peer, str]


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
        self.blobs = BlobHomes()
        pool.watch_down(lambda peer, reason: self.found_down(peer, reason))

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return names_model(method, path)

    def wants_key(self, method: bytes, path: bytes) -> bool:
        return method == b"POST" and wants_key(path) and isinstance(self.strategy, LeastWait)

    def listing(self, method: bytes, path: bytes) -> Listing | None:
        return self.listings.lookup(method, path)

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        if model is None:
            return self._upstreams(self._stable())
        choices = self.strategy.order(model_key(model), key)[: self.attempts]
        if not choices:
            raise NoUpstream(self.pool.why_none())
        return [Upstream(peer.url, peer.address, peer, model, key, reason)
                for peer, reason in choices]  # fmt: skip

    def _stable(self) -> list[Choice]:
        """The servers for a request that names no model: the healthy ones in the order of
        their addresses, those that just failed a request last (else the pool's last
        resort, the unhealthy ones)."""
        peers, healthy = self.pool.eligible()
        if not healthy:
            return [(peer, "unhealthy") for peer in peers]
        ordered = sorted(peers, key=lambda p: (self.pool.recently_failed(p), address_order(p)))
        return [(peer, DEFAULT_ROUTE) for peer in ordered]

    def _upstreams(
        self, choices: Sequence[Choice], on_answer: Callable[[Peer, int], object] | None = None
    ) -> list[Upstream]:
        """Upstreams for the first choices (as many as attempts), each telling on_answer the
        status of the answer relayed from it."""
        if not choices:
            raise NoUpstream(self.pool.why_none())
        return [Upstream(peer.url, peer.address, peer, None, None, reason,
                         partial(on_answer, peer) if on_answer is not None else None)
                for peer, reason in choices[: self.attempts]]  # fmt: skip

    # Model management.

    def plans(self, method: bytes, path: bytes) -> str | None:
        path = path.partition(b"?")[0]
        if path.startswith(BLOBS):
            return AT_ONCE
        return WITH_BODY if path in MANAGED else None

    def plan(self, method: bytes, path: bytes, headers: Headers, body: bytes | None,
             send: Sender) -> Plan:  # fmt: skip
        path = path.partition(b"?")[0]
        request = request_json(body)
        chosen = self._chosen(headers)
        if path.startswith(BLOBS):
            return self._blob(method, path[len(BLOBS) :], chosen)
        if path == b"/api/create":
            return self._create(request, chosen)
        if path == b"/api/pull":
            every = [v.strip().lower() for v in headers.getRawHeaders(SERVERS_HEADER, [])]
            return self._pull(request, chosen, send if b"all" in every and body else None)
        copy = path == b"/api/copy"
        name = named_model(request, "source") if copy else named_model(request, "model", "name")
        if body is None or name is None:  # Ollama will say what is wrong with it
            return self._upstreams(chosen or self._stable())
        return self._everywhere(copy, request, name, chosen, send)

    def _chosen(self, headers: Headers) -> list[Choice] | None:
        """The server X-Ollana-Server names, if the request names one; BadTarget if it is
        none of the pool's."""
        values = headers.getRawHeaders(SERVER_HEADER)
        if not values:
            return None
        wanted = values[-1].decode("utf-8", "replace").strip().lower()
        for peer in self.pool:
            if peer.usable and wanted in (peer.address.lower(), peer.host.lower(), peer.url):
                return [(peer, "chosen")]
        known = ", ".join(sorted(peer.address for peer in self.pool if peer.usable)) or "none"
        raise BadTarget(f"ollana: X-Ollana-Server names no server known here: {wanted!r} "
                        f"(known: {known})")  # fmt: skip

    def _blob(self, method: bytes, name: bytes, chosen: list[Choice] | None) -> list[Upstream]:
        """A blob's HEAD or upload: to the server it was pushed to (or found on), else to
        the stable choice; an upload stored, or a blob found, is remembered there."""
        digest = digest_of(name.decode("ascii", "replace"))
        choices = chosen or self._stable()
        if digest is None:
            return self._upstreams(choices)
        home = self.pool.get(self.blobs.home(digest) or "") if chosen is None else None
        if home is not None and home.usable and home.healthy:
            choices = [(home, "blob"), *(c for c in choices if c[0] is not home)]

        def stored(peer: Peer, code: int) -> None:
            if code == 200 or (method == b"POST" and code == 201):
                self.blobs.remember(digest, peer.key)

        return self._upstreams(choices, stored)

    def _create(self, request: dict[str, object], chosen: list[Choice] | None) -> list[Upstream]:
        """A create: to the server holding most of the blobs it names, else by the model it
        is made from (as generation goes), else to the stable choice."""
        choices = chosen or self._stable()
        if chosen is None:
            counts: dict[str, int] = {}
            for digest in create_digests(request):
                home = self.blobs.home(digest)
                if home is not None:
                    counts[home] = counts.get(home, 0) + 1
            holders = [(peer, "blobs") for peer, _ in choices if counts.get(peer.key)]
            holders.sort(key=lambda choice: -counts[choice[0].key])  # stable: ties keep order
            source = named_model(request, "from")
            if holders:
                choices = [*holders, *(c for c in choices if c[0].key not in counts)]
            elif source is not None:
                choices = self.strategy.order(model_key(source), None) or choices
        return self._upstreams(choices, self._makes(named_model(request, "model", "name")))

    def _pull(self, request: dict[str, object], chosen: list[Choice] | None,
              send: Sender | None) -> list[Upstream]:  # fmt: skip
        """A pull: to the server the strategy would use for its model, or the chosen one;
        with send (X-Ollana-Servers: all), copies go to every other server too, and the
        first one's progress is the answer."""
        model = named_model(request, "model", "name")
        if chosen is not None:
            choices = chosen
        elif model is None:
            choices = self._stable()
        else:
            choices = self.strategy.order(model_key(model), None)
        made = self._makes(model)
        if send is None or not choices:
            return self._upstreams(choices, made)
        first = choices[0][0]
        others, _ = self.pool.eligible()
        for peer in others:
            if peer is not first:
                copy = send(Upstream(peer.url, peer.address, peer))
                copy.addCallback(self._pulled, model, made)
                copy.addErrback(lambda f: log.failure("Error pulling on another server", f))
        return self._upstreams(choices[:1], made)

    def _pulled(self, sent: Sent, model: str | None, made: Callable[[Peer, int], object]) -> None:
        """How a pull's copy ended on another server: said in the log."""
        peer = server_of(sent.upstream)
        last = request_json(sent.body.rstrip().rpartition(b"\n")[2])
        error = sent.error or last.get("error")
        if error is None and sent.code != 200:
            error = f"HTTP {sent.code}"
        if error is None:
            made(peer, 200)
            log.info("Pulled {model} on {server}", model=model, server=peer.address)
        else:
            log.warn("Pulling {model} on {server} failed: {error}", model=model,
                     server=peer.address, error=str(error)[:200])  # fmt: skip

    def _makes(self, model: str | None) -> Callable[[Peer, int], object]:
        """What learns that a server answered a request making model (create, pull): its
        model list has it at once, and is read again at its next check."""

        def made(peer: Peer, code: int) -> None:
            if code == 200 and model is not None:
                peer.models = peer.models | {model_key(model)}
                peer.models_checked = None

        return made

    def _everywhere(
        self, copy: bool, request: dict[str, object], name: str, chosen: list[Choice] | None,
        send: Sender,
    ) -> defer.Deferred[LocalAnswer]:  # fmt: skip
        """A delete or copy: to every server that lists the model (all of them when none
        does: the lists may be late), answered as one Ollama would (merged_answer)."""
        wanted = model_key(name)
        if chosen is not None:
            peers = [peer for peer, _ in chosen]
        else:
            healthy, _ = self.pool.eligible()
            peers = [peer for peer in healthy if wanted in peer.models] or healthy
        if not peers:
            raise NoUpstream(self.pool.why_none())
        destination = named_model(request, "destination") if copy else None
        copies = [send(Upstream(peer.url, peer.address, peer)) for peer in peers]

        def done(results: list[Sent]) -> LocalAnswer:
            for sent in results:
                peer = server_of(sent.upstream)
                if sent.code is not None and 200 <= sent.code < 300:
                    if destination is not None:
                        peer.models = peer.models | {model_key(destination)}
                    elif not copy:
                        peer.models = peer.models - {wanted}
                    peer.models_checked = None
            return merged_answer(results)

        return defer.gatherResults(copies).addCallback(done)

    def missing(self, model: str, asked: Sequence[str]) -> str | None:
        wanted = model_key(model)
        if any(wanted in peer.models for peer in self.pool if peer.usable):
            return None
        return not_found_note(asked)

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        super().started(upstream, watcher)
        peer = server_of(upstream)
        peer.active += 1
        peer.unreported += 1
        if upstream.model is not None:
            model = model_key(upstream.model)
            peer.unreported_models[model] = peer.unreported_models.get(model, 0) + 1
        peer.total_requests += 1

    def answered(self, upstream: Upstream, watcher: Watcher, headers: Headers) -> None:
        self.reported(server_of(upstream), headers)

    def reported(self, peer: Peer, headers: Headers) -> None:
        take_report(peer, headers, self.secret)

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        super().ended(upstream, watcher)
        peer = server_of(upstream)
        peer.active -= 1

    def succeeded(self, upstream: Upstream) -> None:
        peer = server_of(upstream)
        self.pool.request_succeeded(peer)
        self.strategy.served(peer, upstream.model, upstream.key)

    def failed(self, upstream: Upstream, reason: str) -> None:
        peer = server_of(upstream)
        self.checker.suspect(peer, reason)
        self.pool.request_failed(peer, reason)

    def errored(self, upstream: Upstream, reason: str) -> None:
        self.pool.request_failed(server_of(upstream), reason)

    def warm(self, upstream: Upstream) -> bool:
        return upstream.model is not None and upstream.route in WARM_ROUTES

    def lists(self, upstream: Upstream, model: str) -> bool:
        """Whether upstream lists model, or no server does (the lists may be late)."""
        wanted = model_key(model)
        if wanted in server_of(upstream).models:
            return True
        return not any(wanted in peer.models for peer in self.pool if peer.usable)


def server_of(upstream: Upstream) -> Peer:
    """The pool's server an upstream of PoolRouter's is (each of them has one)."""
    assert upstream.server is not None
    return upstream.server


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


def address_order(peer: Peer) -> tuple[int, int, str, int]:
    """A server's place in the order of addresses: IPv4 by number, then IPv6, then names."""
    try:
        address = ipaddress.ip_address(peer.host)
    except ValueError:
        return (2, 0, peer.host, peer.port)
    return (0 if address.version == 4 else 1, int(address), "", peer.port)
