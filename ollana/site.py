"""The listener's side of the proxy: the request factory that starts an exchange as soon
as the headers are in, the channel (timeouts, limits, its own error answers), Ollana's own
pages under /ollana/, the access log, and the site with its graceful drain.

``gotLength`` runs before twisted.web has set the request's method and URI, so they are
read from the channel; that is private to Twisted, which is why setup.cfg pins its range.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request, Site

from ollana.auth import CREDENTIAL_HEADER
from ollana.gate import Gate
from ollana.proxy import Exchange, ProxySettings, access, error_body, error_response

log = Logger()


class ProxyRequest(Request):
    """A request whose body goes upstream as it arrives instead of into a spool file."""

    defaultContentType = None  # Content-Type comes from the upstream, or not at all
    exchange: Exchange | None = None
    _held = False
    _body_complete = False
    _saved_timeout: tuple[float | None] | None = None
    refused = False  # answered (and the connection closed) before its body
    _body_size = 0
    _max_body: int | None = None  # the gate's, kept for each chunk of the body

    def gotLength(self, length: int | None) -> None:
        target = self.channel._path  # see the module docstring
        proxy = getattr(getattr(self.channel, "site", None), "proxy", None)
        if proxy is None:
            super().gotLength(length)
            return
        self.arrived = proxy.clock.seconds()
        host = getattr(self.getClientAddress(), "host", "")
        gate: Gate = proxy.gate
        self._max_body = gate.max_body
        refusal = gate.refusal(host, self.requestHeaders)
        self.requestHeaders.removeHeader(CREDENTIAL_HEADER)  # never passed on
        if refusal is None and gate.max_body is not None and (length or 0) > gate.max_body:
            refusal = 413, f"ollana: request bodies are limited to {gate.max_body} bytes"
        if refusal is not None:
            self.refuse(*refusal)
            return
        if target == b"*" or is_local(target):
            super().gotLength(length)  # answered here: the body (small) is kept as usual
            return
        self.content = io.BytesIO()  # stays empty: the body goes upstream instead
        self.exchange = Exchange(proxy, self, length)

    def refuse(self, code: int, message: str) -> None:
        """Answer at once, before the body, and close: the client need not send it all."""
        self.refused = True
        self.content = io.BytesIO()
        channel: Any = self.channel
        channel.answer_and_close(code, message)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._body_size += len(data)
        limit = self._max_body
        if limit is not None and self._body_size > limit and not self.startedWriting:
            self.refuse(413, f"ollana: request bodies are limited to {limit} bytes")
            return
        if self.exchange is not None:
            self.exchange.received(data)
        elif self.content is not None and self.content.tell() < LOCAL_BODY_LIMIT:
            super().handleContentChunk(data)

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
    held upload suspended is the one restored. Its site knows it while it is open."""

    site: ProxySite
    _headers_due: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Streams are many small writes (a token each): Nagle's algorithm would hold each
        # one back until the previous was acknowledged, which a client's delayed ACK makes
        # up to 40 ms.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.site.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        super().connectionLost(reason)
        self.site.closed(self)

    def dataReceived(self, data: bytes) -> None:
        # A request's head (line and headers) must all come within the gate's
        # header_timeout of its first byte: a client that trickles it (slowloris) is cut off.
        if self._headers_due is None and data and self.line_mode and not self._handlingRequest:
            timeout = self.site.proxy.gate.header_timeout
            self._headers_due = self.callLater(timeout, self._headers_overdue)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._stop_header_timer()
        super().allHeadersReceived()

    def _stop_header_timer(self) -> None:
        due, self._headers_due = self._headers_due, None
        if due is not None and due.active():
            due.cancel()

    def _headers_overdue(self) -> None:
        self._headers_due = None
        self.answer_and_close(408, "ollana: request headers took too long")

    def allContentReceived(self) -> None:
        request = self.requests[-1]
        if isinstance(request, ProxyRequest):
            request.body_complete()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.answer_and_close(431, "ollana: a request line or header is too long")

    def answer_and_close(self, code: int, message: str) -> None:
        """An error answer of our own, then the end of the connection."""
        transport: Any = self.transport
        if transport is None:
            return
        log.info("{code} for {client}: {message}", code=code, message=message,
                 client=getattr(transport.getPeer(), "host", "-"))  # fmt: skip
        transport.write(error_response(code, message))
        self.persistent = False
        transport.loseConnection()


LOCAL_PREFIX = b"/ollana"
LOCAL_BODY_LIMIT = 1 << 20  # bytes of a request body kept for a page of our own


def is_local(target: bytes) -> bool:
    """Whether a request-target is Ollana's own (status, dashboard, metrics)."""
    path = target.partition(b"?")[0]
    return path == LOCAL_PREFIX or path.startswith(LOCAL_PREFIX + b"/")


class ProxyResource(Resource):
    """Answers every path by relaying the exchange its ProxyRequest started."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        if getattr(request, "refused", False):
            return NOT_DONE_YET  # answered already; the connection is closing
        exchange = getattr(request, "exchange", None)
        if exchange is not None:
            exchange.respond()
            return NOT_DONE_YET
        local = getattr(getattr(request.channel, "site", None), "local", None)
        if local is not None and is_local(request.path) and request.postpath:
            request.prepath = [request.postpath.pop(0)]
            return getChildForRequest(local, request).render(request)
        request.setResponseCode(404 if local is None else 500)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return error_body("ollana: nothing here")


class ProxySite(Site):
    """A Site whose requests stream through to an upstream."""

    protocol = ProxyChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 here

    def __init__(self, proxy: ProxySettings, local: Resource | None = None) -> None:
        super().__init__(ProxyResource(), requestFactory=ProxyRequest, reactor=proxy.clock)
        self.proxy = proxy
        self.local = local  # what answers /ollana/...: status, dashboard, metrics
        self.displayTracebacks = False
        self.channels: set[ProxyChannel] = set()
        self._drained: defer.Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        """A channel for an admitted source, within the connection limits; else None,
        which closes the connection at once."""
        gate = self.proxy.gate
        host = getattr(addr, "host", None)
        if host is not None and not gate.admits_source(host):
            return None  # no 403 to write before there is a request: just close
        if gate.max_connections is not None and len(self.channels) >= gate.max_connections:
            log.warn("Refused a connection: {limit} already open", limit=gate.max_connections)
            return None
        limit = gate.max_connections_per_source
        if limit is not None and host is not None:
            open_here = sum(1 for channel in self.channels if _peer_host(channel) == host)
            if open_here >= limit:
                log.warn("Refused a connection from {client}: {limit} already open",
                         client=host, limit=limit)  # fmt: skip
                return None
        return super().buildProtocol(addr)

    def opened(self, channel: ProxyChannel) -> None:
        self.channels.add(channel)
        if self._drained is not None:  # accepted just before the port closed
            channel.persistent = False

    def closed(self, channel: ProxyChannel) -> None:
        self.channels.discard(channel)
        if not self.channels and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Let the requests under way finish, closing each connection after its response;
        close idle connections now, and whatever is still open after timeout seconds."""
        if self._drained is not None:
            return self._drained
        drained: defer.Deferred[None] = defer.Deferred()
        self._drained = drained
        busy = [channel for channel in self.channels if channel.requests]
        for channel in list(self.channels):
            channel.persistent = False  # no next request on this connection
            if not channel.requests:
                channel.loseConnection()
        if not self.channels:
            drained.callback(None)
            return drained
        if busy:
            log.info("Letting {count} request(s) finish, for up to {timeout:g} s",
                     count=len(busy), timeout=timeout)  # fmt: skip
        later = self.proxy.clock.callLater(timeout, self._drain_overdue, timeout)
        drained.addBoth(lambda result: later.cancel() if later.active() else None)
        return drained

    def _drain_overdue(self, timeout: float) -> None:
        log.warn("Closing {count} connection(s) still open after {timeout:g} s",
                 count=len(self.channels), timeout=timeout)  # fmt: skip
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]

    def log(self, request: Any) -> None:
        """One access line per request: the exchange's own, or this for the rest."""
        if getattr(request, "exchange", None) is None:
            duration = self.proxy.clock.seconds() - getattr(request, "arrived", 0.0)
            access(request, None, request.code, duration, 0)


def _peer_host(channel: ProxyChannel) -> str | None:
    return getattr(channel.transport.getPeer(), "host", None) if channel.transport else None
