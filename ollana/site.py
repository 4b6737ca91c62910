"""The listener's side of the proxy: the request factory that starts an exchange as soon
as the headers are in, the channel (timeouts, limits, its own error answers), browsers
answered as Ollama answers them (client mode: preflights here, Ollama's CORS headers on
every answer), Ollana's own pages under /ollana/, the access log, and the site with its
connection caps (answered 503 busy by ``BusyAnswer``) and its graceful drain.

An exchange starts in ``gotLength``, before twisted.web sets the request's method and URI
(it does so once the body is in): the channel reads the request line where twisted.web
hands it over (``lineReceived``) and gives it to its request. Only public twisted.web
hooks are used; tests/test_twisted_contract.py checks the order they are called in.
"""

from __future__ import annotations

import functools
import io
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.server import version as server_version
from zope.interface import implementer

from ollana.access import access
from ollana.auth import CREDENTIAL_HEADER
from ollana.gate import Gate
from ollana.interfaces import IDownstream
from ollana.logs import Summary
from ollana.messages import error_body, error_response
from ollana.proxy import Exchange, ProxySettings
from ollana.upstream import ERROR_HEADER

log = Logger()


@functools.lru_cache(maxsize=2)
def http_date(second: int) -> bytes:
    """The Date header's value for a second (the same for every answer in it)."""
    return datetimeToString(second)


def host_refusal(version: bytes, headers: Headers) -> str | None:
    """Why a request's Host header makes it malformed (RFC 9112 3.2), or None."""
    hosts = headers.getRawHeaders(b"host", [])
    if len(hosts) > 1:
        return "ollana: a request must have one Host header, not several"
    if not hosts and version == b"HTTP/1.1":
        return "ollana: an HTTP/1.1 request must have a Host header"
    return None


@implementer(IDownstream)
class ProxyRequest(Request):
    """A request whose body goes upstream as it arrives instead of into a spool file: the
    downstream side of its exchange."""

    defaultContentType = None  # Content-Type comes from the upstream, or not at all
    exchange: Exchange | None = None
    _held = False
    _body_complete = False
    _saved_timeout: tuple[float | None] | None = None
    refused = False  # answered (and the connection closed) before its body
    _body_size = 0
    clock: IReactorTime
    _rate_since: float | None = None  # the start of the body's current rate window
    _rate_bytes = 0  # body bytes in that window
    _max_body: int | None = None  # the gate's, kept for each chunk of the body
    # (method, request-target, HTTP version): ProxyChannel.lineReceived sets it
    request_line: tuple[bytes, bytes, bytes] = (b"", b"", b"HTTP/1.1")
    _lost = False  # the connection is lost (connectionLost): nothing more to or from it
    cors: tuple[tuple[bytes, bytes], ...] = ()  # CORS headers for the answer (Gate.cors)
    cors_status: int | None = None  # a browser's request answered here: preflight, refusal

    def gotLength(self, length: int | None) -> None:
        proxy = getattr(getattr(self.channel, "site", None), "proxy", None)
        if proxy is None:
            super().gotLength(length)
            return
        method, target, version = self.request_line  # see the module docstring
        self.clock = proxy.clock
        self.arrived = proxy.clock.seconds()
        host = getattr(self.getClientAddress(), "host", "")
        gate: Gate = proxy.gate
        self._max_body = gate.max_body
        malformed = host_refusal(version, self.requestHeaders)
        refusal = (400, malformed) if malformed else gate.refusal(host, self.requestHeaders)
        self.requestHeaders.removeHeader(CREDENTIAL_HEADER)  # never passed on
        if refusal is None and gate.max_body is not None and (length or 0) > gate.max_body:
            refusal = 413, f"ollana: request bodies are limited to {gate.max_body} bytes"
        if refusal is not None:
            self.refuse(*refusal)
            return
        cors = gate.cors(method, self.requestHeaders)
        if cors is not None:
            self.cors = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in cors.headers)
            self.requestHeaders.removeHeader(b"origin")  # judged here, not by a server's Ollama
            if cors.status is not None:
                self.cors_status = cors.status
                self.content = io.BytesIO()  # the body, if any, is read and dropped
                return
        if target == b"*" or is_local(target):
            super().gotLength(length)  # answered here: the body (small) is kept as usual
            return
        self.content = io.BytesIO()  # stays empty: the body goes upstream instead
        self.exchange = Exchange(proxy, self, length)

    def process(self) -> None:
        """A relayed request goes to its exchange at once: twisted.web's resource lookup
        (Request.process) has nothing to find for it. The rest is as process does it."""
        exchange = self.exchange
        if exchange is None or self.refused or self.cors_status is not None:
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]  # (set by Site)
        self.setHeader(b"server", server_version)
        self.setHeader(b"date", http_date(int(self.clock.seconds())))
        try:
            exchange.respond()
        except BaseException:
            self.processingFailed(Failure())

    def refuse(self, code: int, message: str) -> None:
        """Answer at once, before the body, and close: the client need not send it all."""
        self.refused = True
        self.content = io.BytesIO()
        channel = self.channel
        assert isinstance(channel, ProxyChannel)  # the only channel that makes these
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
            if self._too_slow(len(data)):
                self.refuse(408, f"ollana: the request body came slower than "
                                 f"{MIN_BODY_RATE} bytes/s")  # fmt: skip
                return
            self.exchange.received(data)
        elif self.content is not None and self.content.tell() < LOCAL_BODY_LIMIT:
            super().handleContentChunk(data)

    def _too_slow(self, size: int) -> bool:
        """Whether the body has come slower than MIN_BODY_RATE over the last window while
        we were reading it (a trickle would keep an upstream connection forever; a client
        that sends nothing at all meets the channel's timeout instead)."""
        now = self.clock.seconds()
        if self._rate_since is None:
            self._rate_since, self._rate_bytes = now, 0
        self._rate_bytes += size
        elapsed = now - self._rate_since
        if elapsed < BODY_RATE_WINDOW:
            return False
        slow = self._rate_bytes < MIN_BODY_RATE * elapsed and not self.startedWriting
        self._rate_since, self._rate_bytes = now, 0
        return slow

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
        if self._lost:
            return
        self.client_connection.pauseProducing()
        self._held = True
        if not self._body_complete and self._saved_timeout is None:
            self._saved_timeout = (self.channel.setTimeout(None),)

    def release(self) -> None:
        """Read from the client again."""
        if self._held and not self._lost:
            self._held = False
            self._rate_since, self._rate_bytes = self.clock.seconds(), 0  # held: ours
            self._restore_timeout()
            self.client_connection.resumeProducing()

    @property
    def client_connection(self) -> IPushProducer:
        return self.transport  # type: ignore[return-value]

    def _restore_timeout(self) -> None:
        if self._saved_timeout is not None and not self._lost:
            (timeout,), self._saved_timeout = self._saved_timeout, None
            self.channel.setTimeout(timeout)

    def abort(self) -> None:
        """End the client's connection abruptly: a truncated response must not look whole."""
        transport = self.channel.transport if self.channel else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]  # TCP's, TLS's: not ITransport's

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True  # first: the notifyFinish errbacks may call hold or release
        super().connectionLost(reason)
        self.exchange = None  # (see finish)

    def finish(self) -> None:
        super().finish()
        # The exchange has heard (notifyFinish) and holds this request still; without the
        # link back the two are freed as soon as the exchange is done with, not by the
        # cyclic collector, whose full passes stall every stream for tens of milliseconds.
        self.exchange = None

    def write(self, data: bytes) -> None:
        if not self.finished and not self._lost:
            if self.cors and not self.startedWriting:
                self._add_cors()
            super().write(data)

    def _add_cors(self) -> None:
        """Ollama's CORS headers, in place of any an upstream sent."""
        headers = self.responseHeaders
        for name, _ in list(headers.getAllRawHeaders()):
            if name.lower().startswith(b"access-control-"):
                headers.removeHeader(name)
        for name, value in self.cors:
            headers.addRawHeader(name, value)


class ProxyChannel(HTTPChannel):
    """An HTTP channel that tells its request that the body is complete before it turns
    its own idle timeout off for the response (and restores it after), so the timeout a
    held upload suspended is the one restored. Its site knows it while it is open.

    Its idle timeout (the site's, 60 s) is also the request body's: a body from which no
    byte comes for that long (unless we hold the client, see ProxyRequest.hold) is
    answered 408, or the connection dropped once the answer has started; either way the
    request's exchange hears that the client left and drops its upstream attempt."""

    site: ProxySite
    _headers_due: IDelayedCall | None = None
    _parsing = False  # in dataReceived: Twisted's parser is the one acting
    _reading_head = True  # awaiting or reading a request's head (line and headers)
    _timing_head = False  # a head has begun and the header timer counts for it
    _answered = False  # an answer of our own was written: the connection is closing
    last = False  # Ollana is stopping: the request under way, or the next, is the last

    def connectionMade(self) -> None:
        super().connectionMade()
        # Streams are many small writes (a token each): Nagle's algorithm would hold each
        # one back until the previous was acknowledged, which a client's delayed ACK makes
        # up to 40 ms.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        # Asked of every request (twisted.web's Request asks at its start, the exchange for
        # X-Forwarded-*); the same for the whole connection, so read once.
        self._secure = super().isSecure()
        self._host, self._peer = super().getHost(), super().getPeer()
        self.site.opened(self)

    def isSecure(self) -> bool:
        return self._secure

    def getHost(self) -> IAddress:
        return self._host

    def getPeer(self) -> IAddress:
        return self._peer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        super().connectionLost(reason)
        self.site.closed(self)

    def dataReceived(self, data: bytes) -> None:
        # A request's head (line and headers) must all come within the gate's
        # header_timeout of its first byte: a client that trickles it (slowloris) is cut off.
        # One timer per connection, pushed back for each head (a reset is cheaper than a
        # new timer per request); once a head is in, it is left to fire for nothing.
        if not self._timing_head and data and self._reading_head:
            self._timing_head = True
            timeout = self.site.proxy.gate.header_timeout
            due = self._headers_due
            if due is not None and due.active():
                due.reset(timeout)
            else:
                self._headers_due = self.callLater(timeout, self._headers_overdue)
        parsing, self._parsing = self._parsing, True
        try:
            super().dataReceived(data)
        finally:
            self._parsing = parsing

    def lineReceived(self, line: bytes) -> None:
        queued = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > queued:  # a request line: twisted.web made its request
            parts = line.split()
            if len(parts) == 3:  # else twisted.web has answered 400 and is closing
                self.requests[-1].request_line = tuple(parts)

    def requestDone(self, request: Request) -> None:
        if self.persistent:  # twisted.web reads the next request (any bytes kept) now
            self._reading_head = True
        super().requestDone(request)

    def loseConnection(self) -> None:
        # Twisted answers a malformed request (request line, header, chunked body) itself,
        # with a bare "400 Bad Request" head, and then closes through here. That head has
        # no length, so its body runs to the close: give it Ollama's JSON error as body,
        # and a log line. A close while parsing for any other reason is a finished
        # response's (the request is no longer listed) or one of ours (_answered).
        request = self.requests[-1] if self.requests else None
        if (self._parsing and request is not None and not request.startedWriting
                and not self._answered and self.transport is not None):  # fmt: skip
            self._answered = True
            self.site.report_answer(400, _peer_host(self) or "-", MALFORMED)
            self.transport.write(error_body(MALFORMED))
        super().loseConnection()

    def timeoutConnection(self) -> None:
        """Nothing came from the client for timeOut seconds: a request it had started
        sending is answered 408 (unless its answer has started), then the connection ends."""
        request = self.requests[-1] if self.requests else None
        if request is not None and not request.startedWriting:
            self.answer_and_close(408, f"ollana: nothing more of the request came for "
                                       f"{self.timeOut or 0:g} s")  # fmt: skip
        super().timeoutConnection()

    def allHeadersReceived(self) -> None:
        self._reading_head = self._timing_head = False
        super().allHeadersReceived()  # (which judges from the head if the connection stays)
        if self.last:
            self.end_after_request()

    def end_after_request(self) -> None:
        """Close the connection once the request under way is answered, or, if none has
        begun, the next: Ollana is stopping (ProxySite.drain)."""
        self.last = True
        if self.requests and not self._reading_head:
            self.persistent = False
            request = self.requests[-1]
            if not request.startedWriting:  # the client learns it from the answer
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def _stop_header_timer(self) -> None:
        due, self._headers_due = self._headers_due, None
        if due is not None and due.active():
            due.cancel()

    def _headers_overdue(self) -> None:
        self._headers_due = None
        if self._timing_head:
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
        transport = self.transport
        if transport is None or self._answered:
            return
        self._answered = True
        self.site.report_answer(code, _peer_host(self) or "-", message)
        transport.write(error_response(code, message))
        self.persistent = False
        transport.loseConnection()


MALFORMED = "ollana: malformed request (request line, headers or chunked body)"


MIN_BODY_RATE = 1024  # bytes/s a request body must keep up, over each BODY_RATE_WINDOW
BODY_RATE_WINDOW = 60.0
LOCAL_PREFIX = b"/ollana"
LOCAL_BODY_LIMIT = 1 << 20  # bytes of a request body kept for a page of our own


def is_local(target: bytes) -> bool:
    """Whether a request-target is Ollana's own (status, dashboard, metrics)."""
    path = target.partition(b"?")[0]
    return path == LOCAL_PREFIX or path.startswith(LOCAL_PREFIX + b"/")


class ProxyResource(Resource):
    """Answers every path by relaying the exchange its ProxyRequest started."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if getattr(request, "refused", False):
            return NOT_DONE_YET  # answered already; the connection is closing
        cors_status = getattr(request, "cors_status", None)
        if cors_status is not None:  # a preflight, or an origin Ollama refuses
            request.setResponseCode(cors_status)
            return b""
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
        self.turning_away = 0  # connections being answered 503 busy (BusyAnswer)
        self._drained: defer.Deferred[None] | None = None
        self._summaries: dict[object, Summary] = {}

    # Any: a ProxyChannel, a BusyAnswer or None, which callers (tests too) tell apart.
    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel for an admitted source within the connection caps; past a cap, a
        BusyAnswer; None, which closes the connection at once, for a source not admitted
        or past BUSY_AT_ONCE."""
        gate = self.proxy.gate
        host = getattr(addr, "host", None)
        if host is not None and not gate.admits_source(host):
            return None  # no 403 to write before there is a request: just close
        busy = self._over_a_cap(gate, host)
        if busy is None:
            return super().buildProtocol(addr)
        if self.turning_away >= BUSY_AT_ONCE:
            self.summary("ceiling")("Closed a connection from {client} at once: {count} "
                                    "are being answered busy already",
                                    client=host or "-", count=self.turning_away)  # fmt: skip
            return None
        return BusyAnswer(self, busy)

    def _over_a_cap(self, gate: Gate, host: str | None) -> str | None:
        """Why a new connection is over a cap (the busy answer's message), or None."""
        limit = gate.max_connections
        if limit is not None and len(self.channels) >= limit:
            self.summary("in all")("Refused a connection (503 busy): {limit} already open",
                                   limit=limit)  # fmt: skip
            return f"ollana: this server is busy: {limit} connections are open, the most it takes"
        limit = gate.max_connections_per_source
        if limit is not None and host is not None:
            open_here = sum(1 for channel in self.channels if _peer_host(channel) == host)
            if open_here >= limit:
                self.summary("per source")(
                    "Refused a connection from {client} (503 busy): {limit} already open",
                    client=host, limit=limit,
                )  # fmt: skip
                return (f"ollana: this server is busy: {host} has {limit} connections open, "
                        "the most it may")  # fmt: skip
        return None

    def summary(self, kind: object, level: LogLevel = LogLevel.warn) -> Summary:
        """The log line of one kind that a flood could repeat, summarised each minute."""
        summary = self._summaries.get(kind)
        if summary is None:
            summary = self._summaries[kind] = Summary(log, self.proxy.clock, level=level)
        return summary

    def report_answer(self, code: int, client: str, message: str) -> None:
        """Log an error answer of the channel's own (one line a minute per status)."""
        self.summary(code, LogLevel.info)("{code} for {client}: {message}", code=code,
                                          client=client, message=message)  # fmt: skip

    def stopFactory(self) -> None:
        super().stopFactory()
        for summary in self._summaries.values():
            summary.stop()

    def opened(self, channel: ProxyChannel) -> None:
        self.channels.add(channel)
        if self._drained is not None:  # accepted just before the port closed
            channel.end_after_request()

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
            if channel.requests:
                channel.end_after_request()
            else:
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

    def log(self, request: http.Request) -> None:
        """One access line per request: the exchange's own, or this for the rest."""
        if getattr(request, "exchange", None) is None:
            duration = self.proxy.clock.seconds() - getattr(request, "arrived", 0.0)
            access(IDownstream(request), None, request.code, duration, 0)


def _peer_host(connection: Protocol) -> str | None:
    transport = connection.transport
    return getattr(transport.getPeer(), "host", None) if transport is not None else None


# A connection over a cap waits at most BUSY_WAIT seconds for its request head and is read
# BUSY_READ bytes at most; it is answered, and read on (dropped) until it closes or its time
# is up, so that the rest of its request does not reach a closed socket, whose reset could
# lose the answer before the client reads it.
BUSY_WAIT = 2.0
BUSY_READ = 1 << 16
RETRY_BUSY = b"1"  # seconds, in Retry-After
# At most this many connections are answered busy at once; past that, a connection is closed
# at once, without a word: each costs a file descriptor for up to BUSY_WAIT seconds, and a
# flood must not exhaust them. So the listener holds at most its caps plus this many.
BUSY_AT_ONCE = 64


class BusyAnswer(Protocol):
    """A connection over a connection cap: its request is answered 503 with Retry-After
    and X-Ollana-Error: busy, which a client-mode Ollana takes as "try again or elsewhere",
    not as this server failing (a silent close would be)."""

    def __init__(self, site: ProxySite, message: str) -> None:
        self.site = site
        self.message = message
        self.answered = False
        self._read = 0
        self._tail = b""  # the last bytes read, for a head end split between reads
        self._due: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.site.turning_away += 1
        self._due = self.site.proxy.clock.callLater(BUSY_WAIT, self._time_up)

    def dataReceived(self, data: bytes) -> None:
        self._read += len(data)
        if self._read > BUSY_READ:
            self.answer()
            self._close()
        elif not self.answered:
            seen = self._tail + data
            self._tail = seen[-3:]
            if b"\r\n\r\n" in seen:
                self.answer()

    def answer(self) -> None:
        if not self.answered and self.transport is not None:
            self.answered = True
            headers = [(b"Retry-After", RETRY_BUSY), (ERROR_HEADER, b"busy")]
            self.transport.write(error_response(503, self.message, headers))

    def _time_up(self) -> None:
        self._due = None
        self.answer()
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.turning_away -= 1
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()
