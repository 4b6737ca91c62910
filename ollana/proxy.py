"""The streaming reverse proxy: both directions flow as they arrive, with backpressure.

twisted.web's Request spools the whole body before ``render``; ``ProxyRequest`` instead
starts the upstream request as soon as the request headers are in (``gotLength``) and
feeds the body to it chunk by chunk (``handleContentChunk``), pausing the client while
the upstream cannot take more. The upstream's response is relayed the same way, with
its transport registered as the client response's push producer.

``gotLength`` runs before twisted.web has set the request's method and URI, so they are
read from the channel; that is private to Twisted, which is why setup.cfg pins its range.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

log = Logger()

# Hop-by-hop headers (RFC 9110 7.6.1), plus the framing that each side sets itself and
# Expect, which twisted.web already answered with 100 Continue.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
    }
)
VIA = b"1.1 ollana"


def error_body(message: str) -> bytes:
    """An error in Ollama's own shape, which Ollama clients print."""
    return json.dumps({"error": message}).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Upstream:
    """Where one request goes: a base URL, and the name shown in X-Ollana-Peer."""

    url: str
    peer: str | None = None


class NoUpstream(Exception):
    """No server to send the request to; the message says why."""


Chooser = Callable[[], Upstream]


def end_to_end(headers: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """The headers a proxy passes on: all but hop-by-hop ones and those Connection names."""
    connection = headers.getRawHeaders(b"connection", [])
    named = {token.strip().lower() for value in connection for token in value.split(b",")}
    return [
        (name, values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in HOP_BY_HOP
        and name.lower() not in named
        and not name.lower().startswith(b"proxy-")
    ]


@implementer(IBodyProducer)
class RequestBody:
    """The client's request body, passed to the upstream as it arrives.

    While the upstream is not ready or cannot take more, incoming chunks wait here and
    the client's transport is paused, so at most a read or two is ever held.
    """

    def __init__(self, length: int | None, client_transport: Any) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._client = client_transport
        self._consumer: IConsumer | None = None
        self._waiting: list[bytes] = []
        self._paused = False
        self._client_paused = False
        self._complete = False
        self._discarding = False
        self._done: defer.Deferred[None] | None = None

    # From the client side (ProxyRequest).

    def received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is None or self._paused or self._waiting:
            self._waiting.append(data)
            self._pause_client()
        else:
            self._consumer.write(data)

    def completed(self) -> None:
        self._complete = True
        self._maybe_done()

    def discard(self) -> None:
        """The upstream will not read the body: drop it instead of holding it."""
        self._discarding = True
        self._waiting = []
        self._resume_client()

    # IBodyProducer, driven by the upstream connection.

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        done: defer.Deferred[None] = defer.Deferred()
        self._done = done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self.discard()

    def _flush(self) -> None:
        while self._waiting and not self._paused and self._consumer is not None:
            self._consumer.write(self._waiting.pop(0))
        if not self._waiting and not self._paused:
            self._resume_client()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._complete and not self._waiting and self._done is not None:
            done, self._done = self._done, None
            done.callback(None)

    def _pause_client(self) -> None:
        if not self._client_paused and not self._complete:
            self._client_paused = True
            self._client.pauseProducing()

    def _resume_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._client.resumeProducing()


class ResponseRelay(Protocol):
    """Writes the upstream's response body to the client as it arrives."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.finished = False

    def connectionMade(self) -> None:
        self.exchange.relaying(self)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.chunk(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finished = True
        self.exchange.upstream_ended(reason)

    def stop(self) -> None:
        """Drop the upstream connection (the client left, or the upstream went idle)."""
        if not self.finished and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class Exchange:
    """One proxied request, from the client's headers to the end of the upstream's body."""

    def __init__(self, proxy: ProxySettings, request: ProxyRequest, length: int | None) -> None:
        self.proxy = proxy
        self.request = request
        self.client_gone = False
        self.timed_out = False
        self.responding = False
        self.relay: ResponseRelay | None = None
        self._idle: IDelayedCall | None = None
        self.upstream: Upstream | None = None
        self.body: RequestBody | None = None
        request.notifyFinish().addCallbacks(self._request_done, self._client_left)
        channel = request.channel
        method, uri = channel._command, channel._path  # see the module docstring
        try:
            uri = origin_form(uri)
            self.upstream = proxy.choose()
        except (NoUpstream, BadTarget) as e:
            self.response: defer.Deferred[IResponse] = defer.fail(e)
            return
        if length != 0:
            self.body = RequestBody(length, request.transport)
        self.response = proxy.agent.request(
            method,
            self.upstream.url.encode("ascii") + uri,
            self._upstream_headers(),
            self.body,
        )
        self.response.addErrback(self._no_response)
        self._reset_idle()

    def _upstream_headers(self) -> Headers:
        request = self.request
        headers = Headers(dict(end_to_end(request.requestHeaders)))
        client_ip = getattr(request.getClientAddress(), "host", None)
        if client_ip:
            forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
            headers.setRawHeaders(
                b"x-forwarded-for", [b", ".join([*forwarded, client_ip.encode("ascii")])]
            )
        headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
        headers.addRawHeader(b"via", VIA)
        return headers

    def _no_response(self, failure: Failure) -> Failure:
        if self.body is not None:
            self.body.discard()
        return failure

    # Called by ProxyRequest.

    def received(self, data: bytes) -> None:
        if self.body is not None:
            self.body.received(data)

    def completed(self) -> None:
        if self.body is not None:
            self.body.completed()

    def respond(self) -> None:
        """Relay the upstream's answer, or an error, once render has been reached."""
        self.responding = True
        self.response.addCallbacks(self._got_response, self._failed)
        self.response.addErrback(self._bug)

    # The upstream's side.

    def _got_response(self, response: IResponse) -> None:
        if self.client_gone:
            response.deliverBody(_Discard())
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        # twisted.web.client keeps the response's Connection header to itself, so
        # custom headers that it names pass (Ollama sends none).
        headers = Headers(dict(end_to_end(response.headers)))
        if request.method == b"HEAD":  # the length of what a GET would give
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                headers.setRawHeaders(b"content-length", length[-1:])
        elif response.length is not UNKNOWN_LENGTH:
            headers.setRawHeaders(b"content-length", [str(response.length).encode("ascii")])
        headers.addRawHeader(b"via", VIA)
        if self.upstream is not None and self.upstream.peer:
            headers.setRawHeaders(b"x-ollana-peer", [self.upstream.peer.encode("utf-8")])
        request.responseHeaders = headers
        self._reset_idle()
        response.deliverBody(ResponseRelay(self))

    def relaying(self, relay: ResponseRelay) -> None:
        self.relay = relay
        if self.client_gone:
            relay.stop()
        else:
            self.request.registerProducer(relay.transport, True)

    def chunk(self, data: bytes) -> None:
        if not self.client_gone:
            self._reset_idle()
            self.request.write(data)

    def upstream_ended(self, reason: Failure) -> None:
        self._cancel_idle()
        if self.client_gone:
            return
        self.request.unregisterProducer()
        if reason.check(client.ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            log.warn(
                "Upstream {url} broke off a response: {reason}",
                url=self._url(),
                reason=_reason(reason),
            )
            self._abort_client()

    def _failed(self, failure: Failure) -> None:
        self._cancel_idle()
        if self.client_gone:
            return
        code, message, headers = self._describe(failure)
        log.warn("{code} for {method} {path}: {message}", code=code, message=message,
                 method=self.request.method, path=self.request.path)  # fmt: skip
        request = self.request
        request.setResponseCode(code)
        request.responseHeaders = Headers()
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        for name, value in headers.items():
            request.setHeader(name, value)
        body = error_body(message)
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def _describe(self, failure: Failure) -> tuple[int, str, dict[bytes, bytes]]:
        if failure.check(NoUpstream):
            retry = str(int(self.proxy.retry_after)).encode("ascii")
            return 503, str(failure.value), {b"retry-after": retry}
        if failure.check(BadTarget):
            return 400, str(failure.value), {}
        url = self._url()
        if self.timed_out:
            return 504, f"ollana: {url} sent nothing for {self.proxy.idle_timeout:g} s", {}
        if failure.check(error.TimeoutError):
            return 504, f"ollana: cannot connect to {url}: timed out", {}
        return 502, f"ollana: no answer from {url}: {_reason(failure)}", {}

    def _bug(self, failure: Failure) -> None:
        log.failure("Error while relaying a response", failure)
        self._abort_client()

    # Ends.

    def _request_done(self, ignored: None) -> None:
        if not self.responding:  # answered without us (OPTIONS *, say): drop the upstream
            self.response.addErrback(lambda _: None)
            self.response.cancel()

    def _client_left(self, failure: Failure) -> None:
        self.client_gone = True
        self._cancel_idle()
        if self.body is not None:
            self.body.discard()
        if self.relay is not None:
            self.relay.stop()
        else:
            # Fired Deferreds ignore this; one still waiting for the upstream (even when
            # "called", chained to the connection's) cancels it and drops the connection.
            self.response.cancel()
        if not self.responding:  # render never came: nobody else will look at the result
            self.response.addErrback(lambda _: None)

    def _abort_client(self) -> None:
        """End the client's connection abruptly: a truncated response must not look whole."""
        self.client_gone = True
        transport: Any = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()

    def _url(self) -> str:
        return self.upstream.url if self.upstream is not None else "(no upstream)"

    def _reset_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.proxy.clock.callLater(self.proxy.idle_timeout, self._went_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _went_idle(self) -> None:
        self._idle = None
        if self.relay is not None:
            log.warn("Upstream {url} went idle mid-response", url=self._url())
            self.relay.stop()
            self._abort_client()
        else:
            self.timed_out = True
            self.response.cancel()


class BadTarget(Exception):
    """The request-target is not one we can pass on."""


def origin_form(target: bytes) -> bytes:
    """The path and query of a request-target, also from the absolute form proxies get."""
    if target.startswith(b"/"):
        return target
    for scheme in (b"http://", b"https://"):
        if target.lower().startswith(scheme):
            path = target[len(scheme) :].partition(b"/")
            return b"/" + path[2]
    raise BadTarget(f"ollana: cannot proxy the request-target {target[:100]!r}")


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def _reason(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:  # ResponseFailed and friends wrap the real failures
        return "; ".join(_reason(r) for r in reasons)
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0]


@dataclass
class ProxySettings:
    """What every exchange of one listener shares."""

    agent: IAgent
    choose: Chooser
    clock: IReactorTime
    idle_timeout: float = 600.0
    retry_after: float = 5.0


class ProxyRequest(Request):
    """A request whose body goes upstream as it arrives instead of into a spool file."""

    defaultContentType = None  # Content-Type comes from the upstream, or not at all
    exchange: Exchange | None = None

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # stays empty: the body goes upstream instead
        proxy = getattr(getattr(self.channel, "site", None), "proxy", None)
        if proxy is not None and self.channel._path != b"*":  # twisted.web answers OPTIONS *
            self.exchange = Exchange(proxy, self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.received(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.exchange is not None:
            self.exchange.completed()
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        if not self.finished and not self._disconnected:
            super().write(data)


class ProxyResource(Resource):
    """Answers every path by relaying the exchange its ProxyRequest started."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        exchange = getattr(request, "exchange", None)
        if exchange is None:
            request.setResponseCode(500)
            return error_body("ollana: this listener is not set up for proxying")
        exchange.respond()
        return NOT_DONE_YET


class ProxySite(Site):
    """A Site whose requests stream through to an upstream."""

    def __init__(self, proxy: ProxySettings) -> None:
        super().__init__(ProxyResource(), requestFactory=ProxyRequest, reactor=proxy.clock)
        self.proxy = proxy
        self.displayTracebacks = False


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints to upstreams: IP literals straight away, names through the resolver."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


def make_agent(reactor: Any, connect_timeout: float) -> tuple[IAgent, client.HTTPConnectionPool]:
    """An HTTP/1.1 agent with kept-alive connections, enough for many streams per peer."""
    pool = client.HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    endpoints = UpstreamEndpoints(reactor, connect_timeout)
    return client.Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool
