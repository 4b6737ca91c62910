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
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http import NO_BODY_CODES, HTTPChannel, PotentialDataLoss
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
    the client is held (not read from), so at most a read or two is ever kept.
    ``upstream_owes`` tells the exchange whether it is the upstream that keeps the body
    from moving on, which is when the idle timeout counts.
    """

    def __init__(
        self, length: int | None, client: ProxyRequest, upstream_owes: Callable[[bool], None]
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._client = client
        self._upstream_owes = upstream_owes
        self._consumer: IConsumer | None = None
        self._waiting: list[bytes] = []
        self._paused = False
        self._complete = False
        self._discarding = False
        self._done: defer.Deferred[None] | None = None

    @property
    def unfinished(self) -> bool:
        """Whether the upstream still expects more of the body than it got."""
        return not self._discarding and (self._waiting != [] or not self._complete)

    # From the client side (the Exchange).

    def received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is None or self._paused or self._waiting:
            self._waiting.append(data)
            self._client.hold()
        else:
            self._consumer.write(data)

    def completed(self) -> None:
        self._complete = True
        self._maybe_done()

    def discard(self) -> None:
        """The upstream will not read (more of) the body: drop it instead of holding it.

        The body is then never reported as written: the upstream connection, short of
        its body, is closed rather than reused."""
        self._discarding = True
        self._done = None
        self._waiting = []
        self._client.release()

    # IBodyProducer, driven by the upstream connection.

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        done: defer.Deferred[None] = defer.Deferred()
        self._done = done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._upstream_owes(True)
        if self._waiting:
            self._client.hold()

    def resumeProducing(self) -> None:
        self._paused = False
        self._upstream_owes(False)
        self._flush()

    def stopProducing(self) -> None:
        self.discard()

    def _flush(self) -> None:
        while self._waiting and not self._paused and self._consumer is not None:
            self._consumer.write(self._waiting.pop(0))
        if not self._waiting and not self._paused:
            self._client.release()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._complete and not self._waiting and self._done is not None:
            done, self._done = self._done, None
            self._upstream_owes(True)  # now the answer is the upstream's to give
            done.callback(None)


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """Writes the upstream's response body to the client as it arrives.

    It is also the client response's push producer: the client's backpressure pauses
    the upstream connection, and the exchange learns that the wait is not the upstream's.
    """

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

    def pauseProducing(self) -> None:
        if not self.finished:
            self.connection.pauseProducing()
            self.exchange.upstream_owes(False)

    def resumeProducing(self) -> None:
        if not self.finished:
            self.connection.resumeProducing()
            self.exchange.upstream_owes(True)

    def stopProducing(self) -> None:
        """Drop the upstream connection (the client left, or the upstream went idle)."""
        if not self.finished and self.transport is not None:
            self.connection.stopProducing()

    @property
    def connection(self) -> IPushProducer:
        """The upstream connection (a push producer, as every TCP transport is)."""
        return self.transport  # type: ignore[return-value]


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
        except Exception:
            log.failure("Choosing an upstream failed")
            self.response = defer.fail(NoUpstream("ollana: internal error choosing a server"))
            return
        if length != 0:
            self.body = RequestBody(length, request, self.upstream_owes)
        else:
            self.upstream_owes(True)
        self.response = proxy.agent.request(
            method,
            self.upstream.url.encode("ascii") + uri,
            self._upstream_headers(),
            self.body,
        )
        self.response.addBoth(self._answered)

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

    def _answered(self, result: Any) -> Any:
        """The upstream answered or failed: whatever of the body it has not read, it never
        will, so the client may send the rest (dropped) and get its answer."""
        if self.body is not None and self.body.unfinished:
            self.body.discard()
            self.upstream_owes(False)  # until the client has sent the rest
        return result

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
        for name, values in end_to_end(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if request.method == b"HEAD":  # the length of what a GET would give
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.setHeader(b"content-length", length[-1])
        elif response.length is not UNKNOWN_LENGTH and response.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", str(response.length).encode("ascii"))
        request.responseHeaders.addRawHeader(b"via", VIA)
        if self.upstream is not None and self.upstream.peer:
            request.setHeader(b"x-ollana-peer", self.upstream.peer.encode("utf-8"))
        self.upstream_owes(True)
        response.deliverBody(ResponseRelay(self))

    def relaying(self, relay: ResponseRelay) -> None:
        self.relay = relay
        if self.client_gone:
            relay.stopProducing()
        else:
            self.request.registerProducer(relay, True)

    def chunk(self, data: bytes) -> None:
        if not self.client_gone:
            self.upstream_owes(True)
            self.request.write(data)

    def upstream_ended(self, reason: Failure) -> None:
        self.upstream_owes(False)
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
        self.upstream_owes(False)
        if self.client_gone:
            return
        code, message, headers = self._describe(failure)
        log.warn("{code} for {method} {path}: {message}", code=code, message=message,
                 method=self.request.method, path=self.request.path)  # fmt: skip
        request = self.request
        request.setResponseCode(code)
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
        self.upstream_owes(False)
        if not self.responding:  # answered without us (OPTIONS *, say): drop the upstream
            self.response.addErrback(lambda _: None)
            self.response.cancel()

    def _client_left(self, failure: Failure) -> None:
        self.client_gone = True
        self.upstream_owes(False)
        if self.body is not None:
            self.body.discard()
        if self.relay is not None:
            self.relay.stopProducing()
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

    # The idle timeout counts only while the upstream is the one to move next.

    def upstream_owes(self, owes: bool) -> None:
        """Start the idle timeout afresh (the upstream is to move next) or stop it."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if owes and not self.client_gone:
            self._idle = self.proxy.clock.callLater(self.proxy.idle_timeout, self._went_idle)

    def _went_idle(self) -> None:
        self._idle = None
        if self.relay is not None:
            log.warn("Upstream {url} went idle mid-response", url=self._url())
            self.relay.stopProducing()
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
    _held = False
    _body_complete = False
    _saved_timeout: tuple[float | None] | None = None

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # stays empty: the body goes upstream instead
        proxy = getattr(getattr(self.channel, "site", None), "proxy", None)
        if proxy is not None and self.channel._path != b"*":  # twisted.web answers OPTIONS *
            self.exchange = Exchange(proxy, self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.received(data)

    def body_complete(self) -> None:
        """The whole body is in (ProxyChannel calls this before requestReceived)."""
        self._body_complete = True
        self._restore_timeout()
        if self.exchange is not None:
            self.exchange.completed()

    def hold(self) -> None:
        """Stop reading from the client while the upstream cannot take more.

        The channel's idle timeout stops with it: the client is not the one idling.
        Pausing again is harmless, and needed when the channel itself resumed reading.
        """
        if self._disconnected:
            return
        self.client_connection.pauseProducing()
        self._held = True
        if not self._body_complete and self._saved_timeout is None:
            self._saved_timeout = (self.channel.setTimeout(None),)

    def release(self) -> None:
        """Read from the client again."""
        if self._held and not self._disconnected:
            self._held = False
            self._restore_timeout()
            self.client_connection.resumeProducing()

    @property
    def client_connection(self) -> IPushProducer:
        return self.transport  # type: ignore[return-value]

    def _restore_timeout(self) -> None:
        if self._saved_timeout is not None and not self._disconnected:
            (timeout,), self._saved_timeout = self._saved_timeout, None
            self.channel.setTimeout(timeout)

    def write(self, data: bytes) -> None:
        if not self.finished and not self._disconnected:
            super().write(data)


class ProxyChannel(HTTPChannel):
    """An HTTP channel that tells its request that the body is complete before it turns
    its own idle timeout off for the response (and restores it after), so the timeout a
    held upload suspended is the one restored."""

    def allContentReceived(self) -> None:
        request = self.requests[-1]
        if isinstance(request, ProxyRequest):
            request.body_complete()
        super().allContentReceived()


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

    protocol = ProxyChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 here

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
