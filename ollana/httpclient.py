# mypy: strict-equality
# (with that, a misspelt state compared against is a type error, not a silent False)
"""The HTTP/1.1 client that relays requests to upstreams: kept-alive connections, one
request at a time on each, bodies streamed both ways with backpressure.

It answers the same calls as twisted.web.client's Agent (``request`` gives a Deferred of a
response whose body is delivered to a protocol), but it does only what a relay needs, and
leaves the parsing of responses to httptools (the llhttp parser, in C). Twisted's Agent
spent half of the proxy's time per request; this one spends a small part of that.

What an upstream can make it hold is bounded: connections per origin (requests beyond wait
their turn), the size and time of a response head, and the time of a TLS handshake.
A connection's life is one documented state (``Connection.state``, and ``answer`` for the
answer it is reading), as Twisted's HTTP11ClientProtocol keeps its ``_state``.
"""

from __future__ import annotations

import typing
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Literal

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
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

# What a Connection is doing, and how far the answer to its request has come: see its
# docstring. (Strings, as Twisted's: as cheap to compare as an attribute on the hot path.)
ConnectionState = Literal["CONNECTING", "IDLE", "BUSY", "CLOSING", "ABORTING", "LOST"]
AnswerState = Literal["WAITING", "STARTED", "HEAD", "BODY", "WHOLE", "STRAY"]


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

    Its connections tell it three things, and read its ``reactor`` and limits: ``free``
    (done with a request, it may carry another), ``forget`` (closing or dropped, it is not
    to be handed out) and ``lost`` (gone, its place among its origin's is free).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: IAgentEndpointFactory,
        max_idle: int,
        idle_timeout: float,
        max_per_origin: int = MAX_PER_ORIGIN,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
        head_timeout: float = HEAD_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.reactor = reactor
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

    # What its connections tell it.

    def free(self, connection: Connection) -> None:
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
        connection.idle_for(self.idle_timeout)

    def forget(self, connection: Connection) -> None:
        """A connection is closing or dropped: it is not handed out again."""
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.origin]

    def lost(self, connection: Connection, retry: Call | None) -> None:
        """A connection is gone: its place among its origin's goes to retry (the request
        it carried, sent once more on a new connection), else to the first request
        waiting, if any."""
        self.forget(connection)
        if retry is not None:
            self._connect(connection.origin, retry)
        else:
            self._ended(connection.origin)

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
        """Open a connection for call, on a place among origin's counted by the caller (the
        connection holds it until it is lost)."""
        endpoint = self._origin(origin)[0]
        connecting = endpoint.connect(_ConnectionFactory(self, origin))
        call.connecting = connecting
        connecting.addCallbacks(
            self._connected, self._not_connected, callbackArgs=(call,), errbackArgs=(origin, call)
        )

    def _connected(self, connection: Connection, call: Call) -> None:
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


def split_origin(uri: bytes) -> tuple[bytes, bytes]:
    """``http://host:port/path?q`` -> (``http://host:port``, ``/path?q``); ``http://h?q``
    -> (``http://h``, ``/?q``)."""
    start = uri.find(b"://")
    start = start + 3 if start >= 0 else 0
    slash, query = uri.find(b"/", start), uri.find(b"?", start)
    if slash < 0 or 0 <= query < slash:
        if query < 0:
            return uri, b"/"
        return uri[:query], b"/" + uri[query:]
    return uri[:slash], uri[slash:]


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
        self.connecting: defer.Deferred[IProtocol] | None = None
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

    def _cancel(self, result: defer.Deferred[IResponse]) -> None:
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

    def buildProtocol(self, addr: IAddress | None) -> Connection:
        return Connection(self.agent, self.origin)


class _Transport(typing.Protocol):
    """What a Connection uses of its transport: an ITCPTransport that is also an IConsumer
    and an IPushProducer, as TCP's and TLS's are (no one Twisted interface says all that)."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...


@implementer(IHandshakeListener)
class Connection(Protocol):
    """One connection to an upstream, carrying one request at a time.

    Its ``state`` says what it is doing:

    - CONNECTING: built; its transport is not there yet.
    - IDLE: connected, and carrying no request (a new one, or one kept alive between two).
      Any byte now was never asked for: the connection is dropped.
    - BUSY: carrying a request: sending it, and reading its answer (``answer`` says how
      far that has come).
    - CLOSING: closed by us; the transport says when it is gone.
    - ABORTING: dropped by us, and left alone: nothing more is read, paused or resumed.
      What it carried ends when the transport says it is gone (or, if its answer was
      whole, once its request is all sent).
    - LOST: gone.

    Its transitions::

        CONNECTING -> IDLE              connectionMade
        IDLE -> BUSY                    send (by the agent)
        BUSY -> IDLE                    the answer is whole and the request all sent; then
                                        the agent sends another or keeps it, or it closes
        IDLE -> CLOSING                 close (not to be kept, idle too long, the agent
                                        closing, its request cancelled as it connected)
        IDLE, BUSY, CLOSING -> ABORTING abort (bytes never asked for; an answer broken,
                                        over a limit or too slow; a TLS handshake too
                                        slow; a request body that failed or broke its
                                        length; a request cancelled; the response stopped)
        any -> LOST                     connectionLost

    A request is sent on an IDLE connection only, and a BUSY one is not closed: either is
    a RuntimeError. Closing or aborting one that is already going does nothing more.

    While it carries a request, ``answer`` says how far the answer has come (and stays so
    when the connection is aborted, for the request to end as its answer had come):

    - WAITING: nothing of it yet. A kept-alive connection lost now is tried once more.
    - STARTED: some bytes came, but no head is under way: blank lines, or an interim
      answer (100 Continue) before the final one.
    - HEAD: a head is coming; its size and time are bounded (``head_timeout``).
    - BODY: the head is whole and handed over as the response; its body is coming.
    - WHOLE: the answer is whole; the request ends once its body is all sent.
    - STRAY: the answer is whole, and bytes of another, never asked for, came after it:
      they are not read, and the connection is not kept.

    ::

        WAITING -> STARTED -> HEAD -> BODY -> WHOLE -> STRAY
                              HEAD -> STARTED (an interim answer) -> HEAD
                              HEAD -> WHOLE (the answer to a HEAD request)
    """

    # Twisted types it ITransport | None: here it is set before any use (connectionMade),
    # and is also a consumer and a producer.
    transport: _Transport  # type: ignore[assignment]

    def __init__(self, agent: UpstreamAgent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin
        self.state: ConnectionState = "CONNECTING"
        self.answer: AnswerState | None = None  # while it carries a request
        self.call: Call | None = None
        self.response: UpstreamResponse | None = None
        # Beside the state, facts of the request it carries:
        self.reused = False  # it went out on a kept-alive connection (only such are retried)
        # Its body is still being written: that overlaps any stage of the answer (an
        # upstream may answer early) and outlasts an abort.
        self._sending = False
        # The connection may carry another request after this answer: the answer's version
        # and Connection header say so, and nothing came with it that was not asked for.
        self._keep_alive = False
        self._until_close = False  # the answer's body ends with the connection
        self._parser: httptools.HttpResponseParser | None = None
        self._phrase = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_room = 0  # bytes the heads may still take
        self._idle_timer: IDelayedCall | None = None
        self._head_timer: IDelayedCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._lost: list[defer.Deferred[None]] = []
        self._writer: BodyWriter | None = None  # the request body's, while it is sent

    def connectionMade(self) -> None:
        self.state = "IDLE"
        no_delay = getattr(self.transport, "setTcpNoDelay", None)  # absent under TLS
        if no_delay is not None:
            no_delay(True)  # token streams are many small writes: send each at once
        if ISSLTransport.providedBy(self.transport):  # the handshake has just begun
            self._handshake_timer = self.agent.reactor.callLater(
                self.agent.handshake_timeout, self._handshake_timed_out
            )

    def handshakeCompleted(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def idle_for(self, seconds: float) -> None:
        """Close the connection if it is still idle in seconds. One timer for its whole
        life, pushed back each time it idles (a reset costs less than a timer per
        request); one that fires while the connection is busy does nothing."""
        timer = self._idle_timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._idle_timer = self.agent.reactor.callLater(seconds, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.state == "IDLE":
            self.close()

    # Sending.

    def send(self, call: Call, reused: bool) -> None:
        """Send call's request (IDLE -> BUSY)."""
        if self.state != "IDLE":
            raise RuntimeError(f"a request sent on a {self.state} connection")
        self.state = "BUSY"  # the idle timer, if any, is left to fire for nothing
        self.answer = "WAITING"
        self.call = call
        call.connection = self
        self.reused = reused
        self._phrase = b""
        self._raw_headers = []
        self._head_room = self.agent.max_head
        self._keep_alive = True  # until the answer, or something not asked for, says no
        body = call.body
        self._sending = body is not None
        self._parser = httptools.HttpResponseParser(self)
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (call.method, call.path, call.host)]
        if call.headers is not None:
            for name, values in call.headers.getAllRawHeaders():
                for value in values:
                    lines.append(b"%s: %s\r\n" % (name, value))
        if body is None:
            if call.method in (b"POST", b"PUT", b"PATCH"):
                lines.append(b"Content-Length: 0\r\n")
        elif body.length is UNKNOWN_LENGTH:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines.append(b"Content-Length: %d\r\n" % body.length)
        lines.append(b"\r\n")
        transport = self.transport
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
        self.transport.unregisterProducer()
        writer, self._writer = self._writer, None  # (it keeps this connection: a cycle)
        if writer is None or not writer.finish():  # short of its Content-Length
            self.abort()
            return
        self._sending = False
        if self.answer in ("WHOLE", "STRAY"):  # the answer came first
            self._done()

    def _body_failed(self, failure: Failure, call: Call) -> None:
        if self.call is not call:
            return  # that request has ended already: the connection may carry another
        self.abort()

    # Receiving: httptools calls the on_ methods from feed_data.

    def dataReceived(self, data: bytes) -> None:
        if self.state != "BUSY":
            if self.state != "ABORTING":  # nothing was asked: the connection is not trusted
                self.abort()
            return  # (ABORTING: what was under way when we dropped it)
        if self.response is None:
            if not self._receive_head(data):
                return
        elif self.answer == "STRAY":  # an answer never asked for has begun: not read
            return
        else:  # more of its body: _feed's work, inline (this path takes every piece)
            parser = self._parser
            assert parser is not None  # BUSY
            try:
                parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                self._parse_failed(e)
                return
        answer = self.answer
        # Whole now, and the request sent? (Most pieces leave it BODY: that is tested first.)
        if answer != "BODY" and answer in ("WHOLE", "STRAY") and not self._sending:
            self._done()

    def _receive_head(self, data: bytes) -> bool:
        """Parse bytes that come before the response's head has ended, within the limits on
        its size and time; False if the exchange is over."""
        if self.answer == "WAITING":
            self.answer = "STARTED"
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
            if self.state != "BUSY" or not self._feed(data[room:]):
                return False
        if self.answer == "HEAD" and self._head_timer is None:  # cancelled when it ends
            self._head_timer = self.agent.reactor.callLater(
                self.agent.head_timeout, self._head_timed_out
            )
        return True

    def _feed(self, data: bytes) -> bool:
        parser = self._parser
        assert parser is not None  # BUSY
        try:
            parser.feed_data(data)
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
        if self.answer == "STARTED":
            self.answer = "HEAD"
        elif self.answer == "WHOLE":  # bytes after the whole answer: another, never asked for
            self.answer = "STRAY"

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.answer != "HEAD":  # (STRAY: the head of an answer never asked for)
            return
        call, parser = self.call, self._parser
        assert call is not None and parser is not None  # BUSY
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if len(self._raw_headers) > self.agent.max_headers:
            limit = self.agent.max_headers
            raise ResponseHeadTooLarge(f"response head has more than {limit} header lines")
        code = parser.get_status_code()
        if 100 <= code < 200:  # an interim answer (100 Continue): the real one follows
            self.answer = "STARTED"
            self._phrase, self._raw_headers = b"", []
            return
        headers = Headers()
        length: int | str = UNKNOWN_LENGTH
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
        self.answer = "BODY"
        if call.method == b"HEAD" or code in NO_BODY:
            length = 0
            if call.method == b"HEAD":  # llhttp does not know: it would wait for a body
                self.answer = "WHOLE"
                version = parser.get_http_version()
                self._keep_alive = self._keep_alive and _keeps_alive(version, headers)
        self._until_close = length is UNKNOWN_LENGTH and not chunked
        self.response = UpstreamResponse(code, self._phrase.strip(), headers, length, self)
        call.answered(self.response)

    def on_body(self, data: bytes) -> None:
        answer = self.answer
        if answer == "BODY":
            assert self.response is not None  # BODY
            self.response.data(data)
        elif answer == "WHOLE":  # a HEAD answer's "body" (llhttp does not know): not ours
            self.answer = "STRAY"
        elif answer == "STARTED":  # an interim answer's body: not ours, nor a good sign
            self._keep_alive = False

    def on_message_complete(self) -> None:
        # STARTED: an interim answer has ended, and the final one is awaited; STRAY: not ours.
        if self.answer == "BODY" or self.answer == "WHOLE":  # (WHOLE: a HEAD answer's end)
            self.answer = "WHOLE"
            parser = self._parser
            assert parser is not None  # BUSY
            # Only known until this returns.
            self._keep_alive = self._keep_alive and parser.should_keep_alive()

    # Ends.

    def _done(self) -> None:
        """The response is whole and the request sent: end it, and reuse the connection
        (BUSY -> IDLE) if it may be, else close it."""
        response = self.response
        assert response is not None  # its answer is whole
        reusable = self.state == "BUSY" and self.answer == "WHOLE" and self._keep_alive
        self.call = self.response = self._parser = self.answer = None
        if self.state == "BUSY":
            self.state = "IDLE"
        response.end(RESPONSE_DONE)
        if response.paused and self.usable:
            self.transport.resumeProducing()
        if reusable:
            self.agent.free(self)
        else:
            self.close()

    def _broken(self, reason: Failure) -> None:
        """The exchange cannot go on (a bad answer, or the connection is gone): end it as
        far as its answer had come, and drop the connection."""
        call, response, answer = self.call, self.response, self.answer
        self.call = self.response = self._parser = self.answer = None
        if response is not None:
            if answer in ("WHOLE", "STRAY"):  # whole, but the request was still being sent
                response.end(RESPONSE_DONE)
            elif self._until_close and reason.check(*CLOSED) and not response.stopped:
                response.end(Failure(PotentialDataLoss()))  # such a body ends with the connection
            else:
                response.end(Failure(ResponseFailed([reason])))
        elif call is not None:
            if answer == "WAITING":
                call.fail(Failure(ResponseNeverReceived([reason])))
            else:
                call.fail(Failure(ResponseFailed([reason])))
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = "LOST"
        self._writer = None
        self._stop_timers()
        call = self.call
        retry = None
        if call is not None:
            if (
                self.answer == "WAITING"
                and self.reused
                and not call.cancelled
                and call.body is None
                and call.method in RETRYABLE
            ):
                # A kept-alive connection the upstream had closed: try once on a new one,
                # which takes this one's place among its origin's.
                self.call = self._parser = self.answer = None
                call.connection = None
                retry = call
            else:
                self._broken(reason)
        self.agent.lost(self, retry)
        lost, self._lost = self._lost, []
        for waiting in lost:
            waiting.callback(None)

    def _stop_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer, self._handshake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._head_timer = self._handshake_timer = None

    def close(self) -> defer.Deferred[None]:
        """Close the connection (IDLE -> CLOSING); the Deferred fires once it is gone."""
        state = self.state
        if state == "BUSY":
            raise RuntimeError("a BUSY connection closed")
        self.agent.forget(self)
        if state == "CONNECTING" or state == "LOST":
            return defer.succeed(None)
        closed: defer.Deferred[None] = defer.Deferred()
        self._lost.append(closed)
        if state == "IDLE":
            self.state = "CLOSING"
            self.transport.loseConnection()
        return closed

    def abort(self) -> None:
        """Drop the connection (-> ABORTING), and leave it alone from now on."""
        self.agent.forget(self)  # at once: the transport says it is lost a turn later
        self._stop_timers()
        state = self.state
        if state == "IDLE" or state == "BUSY" or state == "CLOSING":
            self.state = "ABORTING"
            self.transport.abortConnection()

    @property
    def usable(self) -> bool:
        """Whether its transport may still be paused or resumed: it is neither closing nor
        dropped, nor gone."""
        return self.state == "BUSY" or self.state == "IDLE"


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The options a message's Connection headers name (close, keep-alive, header names)."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return NO_TOKENS
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


NO_TOKENS: frozenset[bytes] = frozenset()


def _keeps_alive(version: str, headers: Headers) -> bool:
    """Whether a response leaves its connection open, by its version and Connection."""
    tokens = connection_tokens(headers)
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


@implementer(IConsumer)
class BodyWriter:
    """The consumer a request body is written to: it frames it (chunked, or as many bytes
    as the Content-Length said) on the connection's transport."""

    def __init__(self, connection: Connection, length: int | str) -> None:
        self.connection = connection
        self.transport = connection.transport
        self._chunked = length is UNKNOWN_LENGTH
        self._left = length if isinstance(length, int) else 0

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

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
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
        self, code: int, phrase: bytes, headers: Headers, length: int | str, connection: Connection
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: Connection | None = connection
        self._protocol: IProtocol | None = None
        self._early: list[bytes] = []  # body that came before deliverBody
        self._ended: Failure | None = None
        self._unread = False  # paused until a protocol takes the body
        self.paused = False
        self.stopped = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        unread, self._unread = self._unread, False
        if unread:
            self.paused = False  # the connection stays paused unless the protocol wants more
        # Only an IPushProducer, not an ITransport, as IResponse.deliverBody says it is.
        protocol.makeConnection(_ResponseTransport(self))  # type: ignore[arg-type]
        early, self._early = self._early, []
        for data in early:
            if self.stopped:
                break
            protocol.dataReceived(data)
        if self._ended is not None:
            self._protocol = None  # (see end)
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
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            self._ended = reason
        else:
            # Let go of the protocol, whose transport points back here: no cycle is left
            # for the cyclic collector.
            protocol.connectionLost(reason)

    # From the body's protocol, through _ResponseTransport.

    def pause(self) -> None:
        connection = self._connection
        if connection is not None and not self.paused:
            self.paused = True
            if connection.usable:
                connection.transport.pauseProducing()

    def resume(self) -> None:
        connection = self._connection
        if connection is not None and self.paused and not self.stopped:
            self.paused = False
            if connection.usable:
                connection.transport.resumeProducing()

    def stop(self) -> None:
        if self._connection is not None and not self.stopped:
            self.stopped = True
            self._connection.abort()
