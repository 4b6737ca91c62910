"""The HTTP/1.1 client that relays requests to upstreams: kept-alive connections, one
request at a time on each, bodies streamed both ways with backpressure.

It answers the same calls as twisted.web.client's Agent (``request`` gives a Deferred of a
response whose body is delivered to a protocol), but it does only what a relay needs, and
leaves the parsing of responses to httptools (the llhttp parser, in C). Twisted's Agent
spent half of the proxy's time per request; this one spends a small part of that.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
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


@implementer(IAgent)
class UpstreamAgent:
    """Sends requests to upstreams over kept-alive connections, reused per origin.

    ``endpoints`` gives the endpoint for an origin (ollana.upstream.UpstreamEndpoints, which
    also wraps TLS). At most ``max_idle`` unused connections per origin are kept, each for
    at most ``idle_timeout`` seconds.
    """

    def __init__(self, reactor: Any, endpoints: Any, max_idle: int, idle_timeout: float) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._origins: dict[bytes, tuple[IStreamClientEndpoint, bytes]] = {}
        self._idle: dict[bytes, list[Connection]] = {}
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
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
        self._send(origin, call, reuse=True)
        return call.result

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close the unused connections (and, from now on, each one a request is done with);
        the Deferred fires once they are closed."""
        self.closed = True
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle.clear()
        closing = [connection.close() for connection in idle]
        return defer.gatherResults(closing).addCallback(lambda _: None)

    # The connections.

    def _send(self, origin: bytes, call: Call, reuse: bool) -> None:
        endpoint, call.host = self._origin(origin)
        idle = self._idle.get(origin)
        if reuse and idle:
            connection = idle.pop()
            if not idle:
                del self._idle[origin]
            connection.send(call, reused=True)
            return
        connecting = endpoint.connect(_ConnectionFactory(self, origin))
        call.connecting = connecting
        connecting.addCallbacks(call.connected, call.not_connected)

    def _origin(self, origin: bytes) -> tuple[IStreamClientEndpoint, bytes]:
        known = self._origins.get(origin)
        if known is None:
            if len(self._origins) > 1024:  # peers come and go; their endpoints need not stay
                self._origins.clear()
            uri = URI.fromBytes(origin + b"/")
            known = (self._endpoints.endpointForURI(uri), uri.netloc)
            self._origins[origin] = known
        return known

    def _retry(self, origin: bytes, call: Call) -> None:
        self._send(origin, call, reuse=False)

    def _release(self, connection: Connection) -> None:
        """A connection is done with its request and may carry another."""
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


class Connection(Protocol):
    """One connection to an upstream, carrying one request at a time."""

    def __init__(self, agent: UpstreamAgent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin
        self.call: Call | None = None
        self.response: UpstreamResponse | None = None
        self._parser: Any = None
        self._idle_timer: IDelayedCall | None = None
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
        self._received_any = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:  # 101 too
            self._unusable = True
            self._broken(Failure(e))
            return
        if self._complete and self._body_sent:
            self._done()

    def on_message_begin(self) -> None:
        if self._complete:  # bytes after the whole answer: another one, never asked for
            self._unusable = True

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        call = self.call
        assert call is not None
        if self.response is not None:  # a second answer, never asked for: not ours
            self._unusable = True
            return
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
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
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
            # A kept-alive connection the upstream had closed: try once on a new one.
            self.call = self._parser = None
            call.connection = None
            self.agent._retry(self.origin, call)
        elif call is not None:
            self._broken(reason)
        lost, self._lost = self._lost, []
        for waiting in lost:
            waiting.callback(None)

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
