"""Where proxied requests go: the Upstream chosen by a router (IRouter; ``Router`` is the
base of routers) or an answer made here, the headers Ollana nodes tell each other about a
request with (ERROR_HEADER, QUEUE_HEADER), and the HTTP/1.1 agent that reaches upstreams,
with kept-alive connections and TLS."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ollana.httpclient import MAX_PER_ORIGIN, UpstreamAgent
from ollana.interfaces import IRouter
from ollana.peers import Peer

IDLE_CONNECTION_TIMEOUT = 50  # seconds a kept-alive upstream connection may stay unused


def describe_error(value: object) -> str:
    """Why a request to an upstream failed, in a few words for a log line or an answer."""
    reasons = getattr(value, "reasons", None)
    if reasons:  # twisted.web.client wraps the real failures (a TLS rejection, say)
        return "; ".join(describe_error(reason.value) for reason in reasons)
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0]


@dataclass(frozen=True)
class Upstream:
    """Where one request goes: a base URL, the name shown in X-Ollana-Peer, and (in client
    mode) the pool's server it is, for the router's bookkeeping; the model and affinity key
    of the request, and why it goes there (X-Ollana-Route)."""

    url: str
    peer: str | None = None
    server: Peer | None = field(default=None, compare=False, repr=False)
    model: str | None = field(default=None, compare=False)
    key: str | None = field(default=None, compare=False, repr=False)
    route: str | None = field(default=None, compare=False)
    # Told the status of the answer that is relayed from here (what the router learns of a
    # model management request: a blob stored, a model made).
    on_answer: Callable[[int], object] | None = field(default=None, compare=False, repr=False)

    def asked(self, model: str | None, key: str | None) -> Upstream:
        """This upstream for one request's model and affinity key (dataclasses.replace
        spelt out: it runs for every request, and replace's generic way cost 2 % of one)."""
        return Upstream(self.url, self.peer, self.server, model, key, self.route, self.on_answer)


class NoUpstream(Exception):
    """No server to send the request to (a 503); the message says why."""


class Busy(Exception):
    """The upstream would only queue the request, which may go elsewhere (a 503, busy)."""


class UpstreamsFailed(Exception):
    """No server could answer (a 502); the message says what each attempt met."""


@dataclass(frozen=True)
class LocalAnswer:
    """A response made here rather than relayed (a listing merged from several servers)."""

    code: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes


# An answer an Ollana node made itself because it could not serve the request says why in
# this header: "unreachable" (its upstream could not be reached or was found down),
# "timeout" (its upstream sent no answer in time), "busy" (a limit of ours was reached) or
# "refused" (the request itself was at fault). A client-mode node knows from the first three
# (RETRY_ELSEWHERE) that the request never started there, and tries another server.
ERROR_HEADER = b"x-ollana-error"
RETRY_ELSEWHERE = frozenset({"unreachable", "timeout", "busy"})
# Sent by a client-mode node that has another server to try: "if this would only wait in
# your Ollama's queue, say busy at once instead", so a request goes to a free slot if any
# server has one (the last candidate is asked without it, and queues).
QUEUE_HEADER = b"x-ollana-queue"

Listing = Callable[[], defer.Deferred[LocalAnswer]]  # an answer made here, when asked
# When Router.plan routes a request: at once (from its head), or once its (small) body is in.
AT_ONCE, WITH_BODY = "at once", "with body"


@dataclass(frozen=True)
class Sent:
    """What one upstream answered to a copy of a request (ollana.management.Copies): its
    status and content type, and the end of its body; or why there was no answer."""

    upstream: Upstream
    code: int | None = None
    content_type: bytes | None = None
    body: bytes = b""
    error: str | None = None


Sender = Callable[[Upstream], defer.Deferred[Sent]]  # sends a copy of the request there
Plan = list[Upstream] | defer.Deferred[LocalAnswer]  # upstreams to try, or an answer made here


class Watcher(typing.Protocol):
    """What a router tells about an upstream it has given a request to (the exchange)."""

    def upstream_down(self, reason: str) -> None:
        """The upstream was found down while this request was with it."""


@implementer(IRouter)
class Router:
    """The base of routers (IRouter), with a default for each decision and the watchers of
    the attempts under way (``found_down`` tells them). On its own it sends all requests to
    one upstream; server mode's and client mode's (ollana.routing) build on it.
    """

    scan_limit = 0  # bytes of a request body to scan for a "model" (and to keep for retries)

    def __init__(self, upstream: Upstream | None = None) -> None:
        self.upstream = upstream
        self._watchers: dict[object, set[Watcher]] = {}

    def wants_model(self, method: bytes, path: bytes) -> bool:
        """Whether the request's body may name the model that decides where it goes."""
        return False

    def listing(self, method: bytes, path: bytes) -> Listing | None:
        """What answers this request here instead of an upstream, if anything does."""
        return None

    def wants_key(self, method: bytes, path: bytes) -> bool:
        """Whether the request's body (when small) may give a conversation affinity key."""
        return False

    def plans(self, method: bytes, path: bytes) -> str | None:
        """Whether plan() routes this request (model management), AT_ONCE or WITH_BODY."""
        return None

    def plan(self, method: bytes, path: bytes, headers: Headers, body: bytes | None,
             send: Sender) -> Plan:  # fmt: skip
        """Where a request that plans() names goes, given its whole body (None: not read,
        or too large): the upstreams to try, or an answer made here (send sends copies)."""
        return self.candidates(None)

    def missing(self, model: str, asked: Sequence[str]) -> str | None:
        """What to add to a 404 for model from the upstreams asked, if anything."""
        return None

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        """The upstreams to try, in order (at least one), or NoUpstream."""
        if self.upstream is None:
            raise NoUpstream("ollana: no upstream configured")
        return [self.upstream.asked(model, key)]

    def answered(self, upstream: Upstream, watcher: Watcher, headers: Headers) -> None:
        """The upstream's answer to the request has begun (its head, any status)."""

    def admits(self, model: str | None, headers: Headers) -> bool:
        """Whether to pass the request on now; False when it would only wait in the
        upstream's queue and the client said it may go elsewhere (QUEUE_HEADER)."""
        return True

    def warm(self, upstream: Upstream) -> bool:
        """Whether upstream is thought to have its request's model loaded, with a slot free
        or about to be: worth trying before queueing where every slot is taken."""
        return False

    def lists(self, upstream: Upstream, model: str) -> bool:
        """Whether upstream is worth asking for model after another answered 404."""
        return False

    def response_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Headers added to every answer relayed from an upstream."""
        return ()

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        """A request to upstream begins; watcher hears if upstream is found down."""
        self._watchers.setdefault(self._key(upstream), set()).add(watcher)

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        """That request has ended, however it ended."""
        key = self._key(upstream)
        watching = self._watchers.get(key)
        if watching is not None:
            watching.discard(watcher)
            if not watching:
                del self._watchers[key]

    def succeeded(self, upstream: Upstream) -> None:
        """Upstream answered a request, with an answer it is not to blame for."""

    def failed(self, upstream: Upstream, reason: str) -> None:
        """A request could not reach upstream (refused, reset, timed out connecting)."""

    def errored(self, upstream: Upstream, reason: str) -> None:
        """Upstream was reached but failed a request (a server error, or no answer in time)."""

    def found_down(self, key: object, reason: str) -> None:
        """Tell the attempts under way at the upstream with this key that it is down."""
        for watcher in list(self._watchers.get(key, ())):
            watcher.upstream_down(reason)

    def _key(self, upstream: Upstream) -> object:
        """What identifies an upstream for found_down: its server, else its URL."""
        return upstream.server if upstream.server is not None else upstream.url


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints to upstreams: IP literals straight away, names through the resolver."""

    def __init__(
        self,
        reactor: Any,  # Any: IReactorTCP, IReactorTime and a resolver at once (HostnameEndpoint)
        connect_timeout: float,
        tls_for: TLSPolicy | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls_for = tls_for or (lambda host, port: optionsForClientTLS(host))

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls_for(host, uri.port), endpoint)
        return endpoint


# (host, port) -> how to check that server's TLS
TLSPolicy = Callable[[str, int], IOpenSSLClientConnectionCreator]


def make_agent(
    reactor: Any,  # Any: as UpstreamEndpoints's (and the agent's clock)
    connect_timeout: float,
    tls_for: TLSPolicy | None = None,
    max_per_origin: int = MAX_PER_ORIGIN,
) -> UpstreamAgent:
    """The relaying agent (ollana.httpclient): kept-alive connections, enough for many
    streams per peer, closed before an Ollana server's channel (60 s) would close them
    under a new request; at most max_per_origin to one upstream, under a server's cap per
    source; TLS handshakes given as long as connecting. Its closeCachedConnections closes
    them when Ollana stops."""
    endpoints = UpstreamEndpoints(reactor, connect_timeout, tls_for)
    return UpstreamAgent(
        reactor,
        endpoints,
        max_idle=64,
        idle_timeout=IDLE_CONNECTION_TIMEOUT,
        max_per_origin=max_per_origin,
        handshake_timeout=connect_timeout,
    )
