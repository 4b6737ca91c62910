"""The HTTP/1.1 client that relays requests to upstreams: kept-alive connections, one
request at a time on each, bodies streamed both ways with backpressure.

It answers the same calls as twisted.web.client's Agent (``request`` gives a Deferred of a
response whose body is delivered to a protocol), but it does only what a relay needs, and
leaves the parsing of responses to httptools (the llhttp parser, in C). Twisted's Agent
spent half of the proxy's time per request; this one spends a small part of that.

What an upstream can make it hold is bounded: connections per origin (requests beyond wait
their turn), the size and time of a response head, and the time of a TLS handshake.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

# Requests that are sent again on a new connection if a kept-alive one turns out to have
# been closed by the upstream before it answered (as Twisted's Agent does).
RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
NO_BODY = frozenset({204, 304})
CLOSED = (error.ConnectionDone, error.ConnectionLost)
# How every whole response ends, made once (as Twisted's own connectionDone): a Failure
# costs more to make than the rest of a small response's end.
RESPONSE_DONE = Failure(ResponseDone())

# An Ollana server admits 256 connections per source; this leaves room under that for the
# same machine's other clients (health checks, listings) and a second Ollana.
MAX_PER_ORIGIN = 192
MAX_HEAD = 65536  # bytes of a response head (status line and headers, interim heads too)
MAX_HEADERS = 256  # header lines in one response head
HEAD_TIMEOUT = 30.0  # seconds from a head's first byte to its end (not to its first byte)
HANDSHAKE_TIMEOUT = 5.0  # seconds for a TLS handshake


class ResponseHeadTooLarge(Exception):
    """An upstream's response head went over our limit on its bytes or header lines."""


class ResponseHeadTimeout(Exception):
    """An upstream began a response head and did not end it in time."""


class TLSHandshakeTimeout(Exception):
    """An upstream did not complete a TLS handshake in time (a plain-HTTP port, say)."""


class SwitchedProtocols(Exception):
    """An upstream answered 101: what follows is not HTTP, and a relay cannot carry it."""


@implementer(IAgent)
class UpstreamAgent:
    """Sends requests to upstreams over kept-alive connections, reused per origin.

    ``endpoints`` gives the endpoint for an origin (ollana.upstream.UpstreamEndpoints, which
    also wraps TLS). At most ``max_idle`` unused connections per origin are kept, each for
    at most ``idle_timeout`` seconds. At most ``max_per_origin`` connections to one origin
    are open or opening, in use or not; a request beyond waits, first come first served,
    for one to be free or closed. A response head (interim ones included) may have
    ``max_head`` bytes and ``max_headers`` header lines, and may take ``head_timeout``
    seconds from its first byte; a TLS handshake may take ``handshake_timeout`` seconds.
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Any,
        max_idle: int,
        idle_timeout: float,
        max_per_origin: int = MAX_PER_ORIGIN,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
        head_timeout: float = HEAD_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._origins: dict[bytes, tuple[IStreamClientEndpoint, bytes]] = {}
        self._idle: dict[bytes, list[Connection]] = {}
        self._opened: dict[bytes, int] = {}  # connections open or opening, per origin
        self._waiting: dict[bytes, deque[Call]] = {}  # requests waiting for one, per origin
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_per_origin = max_per_origin
        self.max_head = max_head
        self.max_headers = max_headers
        self.head_timeout = head_timeout
        self.handshake_timeout = handshake_timeout
        self.closed = False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        """Send method to the absolute uri; the response comes once its headers have."""
        origin, path = split_origin(uri)
        call = Call(method, path, headers, bodyProducer)
        self._send(origin, call)
        return call.result

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close the unused connections (and, from now on, each one a request is done with);
        the Deferred fires once they are closed. Requests still waiting for a connection
        are sent as before (they are requests under way, as when Ollana drains)."""
        self.closed = True
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle.clear()
        closing = [connection.close() for connection in idle]
        return defer.gatherResults(closing).addCallback(lambda _: None)

    # The connections.

    def _send(self, origin: bytes, call: Call) -> None:
        """Send call on an idle connection, else on a new one, else when one is free."""
        call.host = self._origin(origin)[1]
        idle = self._idle.get(origin)
        if idle:
            connection = idle.pop()
            if not idle:
                del self._idle[origin]
            connection.send(call, reused=True)
            return
        opened = self._opened.get(origin, 0)
        if opened >= self.max_per_origin:
            waiting = self._waiting.get(origin)
            if waiting is None:
                waiting = self._waiting[origin] = deque()
            waiting.append(call)
            call.queued = partial(self._unqueue, origin, call)
            return
        self._opened[origin] = opened + 1
        self._connect(origin, call)

    def _connect(self, origin: bytes, call: Call) -> None:
        """Open a connection for call, on a place among origin's counted by the caller."""
        endpoint = self._origin(origin)[0]
        connecting = endpoint.connect(_ConnectionFactory(self, origin))
        call.connecting = connecting
        connecting.addCallbacks(
            self._connected, self._not_connected, callbackArgs=(call,), errbackArgs=(origin, call)
        )

    def _connected(self, connection: Connection, call: Call) -> None:
        connection.holds_place = True  # given up when it is lost
        call.connected(connection)

    def _not_connected(self, failure: Failure, origin: bytes, call: Call) -> None:
        call.not_connected(failure)
        self._ended(origin)

    def _ended(self, origin: bytes) -> None:
        """A connection to origin (or an attempt at one) is over: its place goes to the
        first request waiting, if any."""
        call = self._next_waiting(origin)
        if call is not None:
            self._connect(origin, call)
            return
        left = self._opened[origin] - 1
        if left:
            self._opened[origin] = left
        else:
            del self._opened[origin]

    def _next_waiting(self, origin: bytes) -> Call | None:
        waiting = self._waiting.get(origin)
        if not waiting:
            return None
        call = waiting.popleft()
        if not waiting:
            del self._waiting[origin]
        call.queued = None
        return call

    def _unqueue(self, origin: bytes, call: Call) -> None:
        """A waiting request was cancelled."""
        waiting = self._waiting[origin]
        waiting.remove(call)
        if not waiting:
            del self._waiting[origin]

    def _origin(self, origin: bytes) -> tuple[IStreamClientEndpoint, bytes]:
        known = self._origins.get(origin)
        if known is None:
            if len(self._origins) > 1024:  # peers come and go; their endpoints need not stay
                self._origins.clear()
            uri = URI.fromBytes(origin + b"/")
            known = (self._endpoints.endpointForURI(uri), uri.netloc)
            self._origins[origin] = known
        return known

    def _release(self, connection: Connection) -> None:
        """A connection is done with its request and may carry another: the first one
        waiting, else none for now."""
        if self._waiting:
            call = self._next_waiting(connection.origin)
            if call is not None:
                connection.send(call, reused=True)
                return
        idle = self._idle.get(connection.origin, [])
        if self.closed or len(idle) >= self.max_idle:
            connection.close()
            return
        self._idle[connection.origin] = idle
        idle.append(connection)
        connection.idle_since(self._reactor.callLater(self.idle_timeout, connection.close))

    def _forget(self, connection: Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.origin]


def split_origin(uri: bytes) -> tuple[bytes, bytes]:
    """``http://host:port/path?q`` -> (``http://host:port``, ``/path?q``); ``http://h?q``
    -> (``http://h``, ``/?q``)."""
    start = uri.find(b"://")
    start = start + 3 if start >= 0 else 0
    ends = [i for i in (uri.find(b"/", start), uri.find(b"?", start)) if i >= 0]
    if not ends:
        return uri, b"/"
    end = min(ends)
    path = uri[end:]
    return uri[:end], path if path.startswith(b"/") else b"/" + path


class Call:
    """One request, from sending to the response's headers (its ``result``)."""

    host = b""
    queued: Callable[[], None] | None = None  # while it waits: what takes it out of the queue

    def __init__(
        self, method: bytes, path: bytes, headers: Headers | None, body: IBodyProducer | None
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.result: defer.Deferred[IResponse] = defer.Deferred(self._cancel)
        self.connecting: defer.Deferred[Any] | None = None
        self.connection: Connection | None = None
        self.cancelled = False

    def connected(self, connection: Connection) -> None:
        self.connecting = None
        if self.cancelled:  # too late to stop connecting: the connection is not needed
            connection.close()
            return
        connection.send(self, reused=False)

    def not_connected(self, failure: Failure) -> None:
        self.connecting = None
        self.fail(failure)

    def answered(self, response: UpstreamResponse) -> None:
        if not self.result.called:
            self.result.callback(response)

    def fail(self, failure: Failure) -> None:
        if not self.result.called:
            self.result.errback(failure)

    def _cancel(self, result: defer.Deferred[Any]) -> None:
        self.cancelled = True
        if self.queued is not None:
            self.queued()
            self.queued = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.connection is not None:
            self.connection.abort()


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line for every upstream connection

    def __init__(self, agent: UpstreamAgent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin

    def buildProtocol(self, addr: Any) -> Connection:
        return Connection(self.agent, self.origin)


@implementer(IHandshakeListener)
class Connection(Protocol):
    """One connection to an upstream, carrying one request at a time."""

    holds_place = False  # counted among its origin's connections (until it is lost)

    def __init__(self, agent: UpstreamAgent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin
        self.call: Call | None = None
        self.response: UpstreamResponse | None = None
        self._parser: Any = None
        self._idle_timer: IDelayedCall | None = None
        self._head_timer: IDelayedCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._lost: list[defer.Deferred[None]] = []
        self.open = False
        self.aborted = False
        self._complete = False
        self.reused = False

    def connectionMade(self) -> None:
        self.open = True
        no_delay = getattr(self.transport, "setTcpNoDelay", None)  # absent under TLS
        if no_delay is not None:
            no_delay(True)  # token streams are many small writes: send each at once
        if ISSLTransport.providedBy(self.transport):  # the handshake has just begun
            self._handshake_timer = self.agent._reactor.callLater(
                self.agent.handshake_timeout, self._handshake_timed_out
            )

    def handshakeCompleted(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def idle_since(self, timer: IDelayedCall) -> None:
        self._idle_timer = timer

    # Sending.

    def send(self, call: Call, reused: bool) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self.call = call
        call.connection = self
        self.reused = reused
        self.response = None
        self._phrase = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_room = self.agent.max_head  # bytes the heads may still take
        self._in_head = False  # a head has begun and not ended
        self._informational = False
        self._complete = False  # the answer is whole
        self._keep_alive = False
        self._until_close = False
        self._unusable = False
        self._received_any = False
        self._body_sent = call.body is None
        self._parser = httptools.HttpResponseParser(self)
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (call.method, call.path, call.host)]
        if call.headers is not None:
            for name, values in call.headers.getAllRawHeaders():
                for value in values:
                    lines.append(b"%s: %s\r\n" % (name, value))
        body = call.body
        if body is None:
            if call.method in (b"POST", b"PUT", b"PATCH"):
                lines.append(b"Content-Length: 0\r\n")
        elif body.length is UNKNOWN_LENGTH:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines.append(b"Content-Length: %d\r\n" % body.length)
        lines.append(b"\r\n")
        transport: Any = self.transport
        transport.write(b"".join(lines))
        if body is not None:
            writer = BodyWriter(self, body.length)
            self._writer = writer
            transport.registerProducer(body, True)
            sent = body.startProducing(writer)
            sent.addCallbacks(
                self._body_done, self._body_failed, callbackArgs=(call,), errbackArgs=(call,)
            )

    def _body_done(self, ignored: object, call: Call) -> None:
        if self.call is not call:
            return  # that request has ended already
        transport: Any = self.transport
        transport.unregisterProducer()
        if self._writer.finish():
            self._body_sent = True
            if self._complete:  # the answer came first; the connection may now be reused
                self._done()
        else:
            self._unusable = True
            self.abort()

    def _body_failed(self, failure: Failure, call: Call) -> None:
        if self.call is not call:
            return  # that request has ended already: the connection may carry another
        self._unusable = True
        self.abort()

    # Receiving: httptools calls these from feed_data.

    def dataReceived(self, data: bytes) -> None:
        if self.aborted:  # what was under way when we dropped it
            return
        if self._parser is None:  # nothing was asked: the connection is not to be trusted
            self.abort()
            return
        if self.response is None:
            if not self._receive_head(data):
                return
        elif self._unusable:  # an answer never asked for has begun: not read, nor kept
            return
        else:
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                self._parse_failed(e)
                return
        if self._complete and self._body_sent:
            self._done()

    def _receive_head(self, data: bytes) -> bool:
        """Parse bytes that come before the response's head has ended, within the limits on
        its size and time; False if the exchange is over."""
        self._received_any = True
        room = self._head_room
        if len(data) <= room:
            self._head_room = room - len(data)
            if not self._feed(data):
                return False
        else:
            self._head_room = 0
            if not self._feed(data[:room]):
                return False
            if self.response is None:
                limit = self.agent.max_head
                self._refuse(ResponseHeadTooLarge(f"response head larger than {limit} bytes"))
                return False
            if self._parser is None or self.aborted or not self._feed(data[room:]):
                return False
        if self._in_head and self._head_timer is None:  # cancelled when the head ends
            self._head_timer = self.agent._reactor.callLater(
                self.agent.head_timeout, self._head_timed_out
            )
        return True

    def _feed(self, data: bytes) -> bool:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._parse_failed(e)
            return False
        return True

    def _parse_failed(self, e: Exception) -> None:
        if isinstance(e, httptools.HttpParserUpgrade):  # its message is only an error code
            reason: BaseException = SwitchedProtocols(
                "upstream switched protocols (101), which cannot be relayed"
            )
        elif isinstance(e.__context__, ResponseHeadTooLarge):  # raised by on_headers_complete
            reason = e.__context__
        else:
            reason = e
        self._refuse(reason)

    def _refuse(self, reason: BaseException) -> None:
        """The answer breaks the protocol or a limit of ours: fail it, drop the connection."""
        self._unusable = True
        self._broken(Failure(reason))

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        timeout = self.agent.handshake_timeout
        self._refuse(TLSHandshakeTimeout(f"TLS handshake timed out after {timeout:g} s"))

    def _head_timed_out(self) -> None:
        self._head_timer = None
        timeout = self.agent.head_timeout
        self._refuse(ResponseHeadTimeout(f"response head timed out after {timeout:g} s"))

    def on_message_begin(self) -> None:
        self._in_head = True
        if self._complete:  # bytes after the whole answer: another one, never asked for
            self._unusable = True

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        call = self.call
        assert call is not None
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.response is not None:  # a second answer, never asked for: not ours
            self._unusable = True
            return
        if len(self._raw_headers) > self.agent.max_headers:
            limit = self.agent.max_headers
            raise ResponseHeadTooLarge(f"response head has more than {limit} header lines")
        code = self._parser.get_status_code()
        if 100 <= code < 200:  # an interim answer (100 Continue): the real one follows
            self._informational = True
            self._phrase, self._raw_headers = b"", []
            return
        headers = Headers()
        length: int | object = UNKNOWN_LENGTH
        chunked = False
        for name, value in self._raw_headers:
            headers.addRawHeader(name, value)
            lowered = name.lower()
            if lowered == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            length = UNKNOWN_LENGTH
        if call.method == b"HEAD" or code in NO_BODY:
            length = 0
            if call.method == b"HEAD":  # llhttp does not know: it would wait for a body
                self._complete = True
                self._keep_alive = _keeps_alive(self._parser.get_http_version(), headers)
        self._until_close = length is UNKNOWN_LENGTH and not chunked
        self.response = UpstreamResponse(code, self._phrase.strip(), headers, length, self)
        call.answered(self.response)

    def on_body(self, data: bytes) -> None:
        if self.response is None or self._complete:  # a HEAD answer's "body": not for us
            self._unusable = True
            return
        self.response.data(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()  # only known until it returns

    # Ends.

    def _done(self) -> None:
        """The response is whole and the body sent: end it, and reuse the connection."""
        response = self.response
        reusable = self._keep_alive and not self._unusable
        self.call = self.response = self._parser = None
        if response is not None:
            response.end(RESPONSE_DONE)
            reusable = reusable and not response.stopped
            if response.paused and self.usable:
                self.transport.resumeProducing()  # type: ignore[union-attr]
        if reusable:
            self.agent._release(self)
        else:
            self.close()

    def _broken(self, reason: Failure) -> None:
        """The exchange cannot go on (bad answer, or the connection is gone)."""
        call, response = self.call, self.response
        self.call = self.response = self._parser = None
        if response is not None:
            if self._complete:  # whole, but the body was still being sent
                response.end(RESPONSE_DONE)
            elif self._until_close and reason.check(*CLOSED) and not response.stopped:
                response.end(Failure(PotentialDataLoss()))  # such a body ends with the connection
            else:
                response.end(Failure(ResponseFailed([reason])))
        elif call is not None:
            if self._received_any:
                call.fail(Failure(ResponseFailed([reason])))
            else:
                call.fail(Failure(ResponseNeverReceived([reason])))
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self._stop_timers()
        self.agent._forget(self)
        call = self.call
        if (
            call is not None
            and self.response is None
            and self.reused
            and not self._received_any
            and not call.cancelled
            and call.body is None
            and call.method in RETRYABLE
        ):
            # A kept-alive connection the upstream had closed: try once on a new one, which
            # takes this one's place among its origin's.
            self.call = self._parser = None
            call.connection = None
            self.holds_place = False
            self.agent._connect(self.origin, call)
        elif call is not None:
            self._broken(reason)
        if self.holds_place:
            self.holds_place = False
            self.agent._ended(self.origin)
        lost, self._lost = self._lost, []
        for waiting in lost:
            waiting.callback(None)

    def _stop_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer, self._handshake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._head_timer = self._handshake_timer = None

    def close(self) -> defer.Deferred[None]:
        """Close the connection; the Deferred fires once it is closed."""
        self.agent._forget(self)
        if not self.open:
            return defer.succeed(None)
        closed: defer.Deferred[None] = defer.Deferred()
        self._lost.append(closed)
        self.transport.loseConnection()  # type: ignore[union-attr]
        return closed

    def abort(self) -> None:
        self.agent._forget(self)  # at once: the transport says it is lost a turn later
        self._stop_timers()
        if self.open and not self.aborted:
            self.aborted = True  # and left alone from now on: not paused, not resumed
            self.transport.abortConnection()  # type: ignore[union-attr]

    @property
    def usable(self) -> bool:
        """Whether its transport may still be paused or resumed."""
        return self.open and not self.aborted and not self.transport.disconnecting  # type: ignore[union-attr]


def connection_tokens(headers: Headers) -> set[bytes]:
    """The options a message's Connection headers name (close, keep-alive, header names)."""
    return {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }


def _keeps_alive(version: str, headers: Headers) -> bool:
    """Whether a response leaves its connection open, by its version and Connection."""
    tokens = connection_tokens(headers)
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


class BodyWriter:
    """The consumer a request body is written to: it frames it (chunked, or as many bytes
    as the Content-Length said) on the connection's transport."""

    def __init__(self, connection: Connection, length: int | object) -> None:
        self.connection = connection
        self.transport: Any = connection.transport
        self._chunked = length is UNKNOWN_LENGTH
        self._left: int = 0 if self._chunked else length  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
            return
        self._left -= len(data)
        if self._left < 0:
            self.abort()  # more than it said: framing would break
            return
        self.transport.write(data)

    def finish(self) -> bool:
        """The body is all written: end its framing. False if it came out short."""
        if self._chunked:
            self.transport.write(b"0\r\n\r\n")
            return True
        return self._left == 0

    def abort(self) -> None:
        """Drop the connection: the rest of the body will not be sent."""
        self.connection.abort()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


@implementer(IPushProducer)
class _ResponseTransport:
    """What a response's body protocol sees as its transport: pausing it pauses reading
    from the connection; stopping it drops the connection. Calls made once the response
    has ended do nothing, as the connection may already carry another request."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response.pause()

    def resumeProducing(self) -> None:
        self._response.resume()

    def stopProducing(self) -> None:
        self._response.stop()


@implementer(IResponse)
class UpstreamResponse:
    """An upstream's answer: its head at once, its body delivered to a protocol."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int, phrase: bytes, headers: Headers, length: Any, connection: Connection
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: Connection | None = connection
        self._protocol: Any = None
        self._early: list[bytes] = []  # body that came before deliverBody
        self._ended: Failure | None = None
        self._unread = False  # paused until a protocol takes the body
        self.paused = False
        self.stopped = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        unread, self._unread = self._unread, False
        if unread:
            self.paused = False  # the connection stays paused unless the protocol wants more
        protocol.makeConnection(_ResponseTransport(self))
        early, self._early = self._early, []
        for data in early:
            if self.stopped:
                break
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
        elif unread and not self.paused:
            self.paused = True
            self.resume()

    # From the connection.

    def data(self, data: bytes) -> None:
        if self.stopped:
            return
        if self._protocol is None:
            self._early.append(data)
            if not self.paused:
                self.pause()  # nobody reads yet: read no more
                self._unread = self.paused
        else:
            self._protocol.dataReceived(data)

    def end(self, reason: Failure) -> None:
        self._connection = None
        if self._protocol is None:
            self._ended = reason
        else:
            self._protocol.connectionLost(reason)

    # From the body's protocol, through _ResponseTransport.

    def pause(self) -> None:
        connection = self._connection
        if connection is not None and not self.paused:
            self.paused = True
            if connection.usable:
                connection.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        connection = self._connection
        if connection is not None and self.paused and not self.stopped:
            self.paused = False
            if connection.usable:
                connection.transport.resumeProducing()  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._connection is not None and not self.stopped:
            self.stopped = True
            self._connection.abort()
