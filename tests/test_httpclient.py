"""ollana.httpclient's UpstreamAgent in memory: upstream connections on a MemoryReactorClock,
each one a StringTransport, answered by feeding bytes to its protocol.

Flow control is asserted through the transports' ``producerState`` (reading from the
upstream) and ``producer`` (the request body), as Twisted's own HTTP tests do.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from ollana.httpclient import UpstreamAgent
from ollana.upstream import UpstreamEndpoints, make_agent
from tests.test_proxy import head, header_values

ORIGIN = b"http://127.0.0.1:11434"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@implementer(IBodyProducer)
class Body:
    """A request body written when the test says, ending when the test says."""

    def __init__(self, length: int | object = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: Any = None
        self.finished: Deferred[None] = Deferred()
        self.state = "new"

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        self.state = "producing"
        return self.finished

    def write(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.consumer.write(chunk)

    def finish(self) -> None:
        self.finished.callback(None)

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class Collect(Protocol):
    """A response body's protocol: keeps what it gets; pauses at each piece if told."""

    def __init__(self, pause_each: bool = False) -> None:
        self.pieces: list[bytes] = []
        self.ended: Failure | None = None
        self.pause_each = pause_each

    def dataReceived(self, data: bytes) -> None:
        assert self.ended is None, "data after the end"
        self.pieces.append(data)
        if self.pause_each:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert self.ended is None, "ended twice"
        self.ended = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    def assert_done(self) -> None:
        """The body ended whole (ResponseDone); otherwise its failure is raised."""
        assert self.ended is not None, "not ended"
        self.ended.trap(ResponseDone)


class Upstreams:
    """An UpstreamAgent and the upstream connections it opens, accepted one at a time."""

    def __init__(self, max_idle: int | None = None) -> None:
        self.reactor = MemoryReactorClock()
        if max_idle is None:
            self.agent = make_agent(self.reactor, connect_timeout=5)
        else:
            endpoints = UpstreamEndpoints(self.reactor, 5)
            self.agent = UpstreamAgent(self.reactor, endpoints, max_idle, idle_timeout=50)
        self.handled = 0  # connection attempts accepted or refused so far
        self.protocols: list[Any] = []
        self.transports: list[StringTransport] = []

    def request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/api/tags",
        headers: Headers | None = None,
        body: Body | None = None,
    ) -> Deferred[Any]:  # of an UpstreamResponse
        return self.agent.request(method, ORIGIN + path, headers, body)

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def connect(self) -> StringTransport:
        """Accept the agent's next connection attempt, which must go to 127.0.0.1:11434."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[self.handled]
        assert (host, port, timeout) == ("127.0.0.1", 11434, 5), (host, port, timeout)
        self.handled += 1
        address = IPv4Address("TCP", host, port)
        protocol: Any = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return transport

    def refuse(self) -> None:
        _, _, factory, _, _ = self.reactor.tcpClients[self.handled]
        connector = self.reactor.connectors[self.handled]
        self.handled += 1
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))

    def answer(self, data: bytes, index: int = -1) -> None:
        self.protocols[index].dataReceived(data)

    def lose(self, index: int = -1, reason: Exception | None = None) -> None:
        self.protocols[index].connectionLost(Failure(reason or error.ConnectionDone()))


def after_head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


class RequestTests(SynchronousTestCase):
    def test_request_line_host_and_headers(self) -> None:
        up = Upstreams()
        headers = Headers({b"X-Custom": [b"one", b"two"], b"Accept": [b"application/json"]})
        up.request(b"GET", b"/api/tags?q=1&r=%2F", headers)
        transport = up.connect()
        sent = transport.value()
        self.assertEqual(head(sent)[0], b"GET /api/tags?q=1&r=%2F HTTP/1.1")
        self.assertEqual(header_values(sent, b"host"), [b"127.0.0.1:11434"])
        self.assertEqual(header_values(sent, b"x-custom"), [b"one", b"two"])
        self.assertEqual(header_values(sent, b"accept"), [b"application/json"])
        self.assertEqual(header_values(sent, b"content-length"), [])
        self.assertEqual(header_values(sent, b"transfer-encoding"), [])
        self.assertTrue(sent.endswith(b"\r\n\r\n"), sent)
        self.assertEqual(after_head(sent), b"")
        self.assertIsNone(transport.producer)

    def test_body_of_known_length(self) -> None:
        up = Upstreams()
        body = Body(length=11)
        up.request(b"POST", b"/api/chat", Headers({b"Content-Type": [b"text/plain"]}), body)
        transport = up.connect()
        self.assertEqual(head(transport.value())[0], b"POST /api/chat HTTP/1.1")
        self.assertEqual(header_values(transport.value(), b"content-length"), [b"11"])
        self.assertEqual(header_values(transport.value(), b"transfer-encoding"), [])
        self.assertEqual(header_values(transport.value(), b"content-type"), [b"text/plain"])
        self.assertIs(transport.producer, body)  # the connection's writes pause the body
        self.assertTrue(transport.streaming)
        body.write(b"hello", b" ", b"world")
        body.finish()
        self.assertEqual(after_head(transport.value()), b"hello world")
        self.assertIsNone(transport.producer)
        self.assertFalse(transport.disconnecting)

    def test_body_of_unknown_length_is_chunked(self) -> None:
        up = Upstreams()
        body = Body()
        up.request(b"POST", b"/api/generate", None, body)
        transport = up.connect()
        self.assertEqual(header_values(transport.value(), b"transfer-encoding"), [b"chunked"])
        self.assertEqual(header_values(transport.value(), b"content-length"), [])
        body.write(b"abc", b"", b"0123456789abcdef")
        self.assertEqual(after_head(transport.value()), b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n")
        body.finish()
        self.assertEqual(
            after_head(transport.value()),
            b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
        )
        self.assertIsNone(transport.producer)

    def test_bodyless_post_says_content_length_0(self) -> None:
        up = Upstreams()
        up.request(b"POST", b"/api/pull")
        transport = up.connect()
        self.assertEqual(head(transport.value())[0], b"POST /api/pull HTTP/1.1")
        self.assertEqual(header_values(transport.value(), b"content-length"), [b"0"])
        self.assertEqual(header_values(transport.value(), b"transfer-encoding"), [])
        self.assertEqual(after_head(transport.value()), b"")

    def test_body_of_length_0(self) -> None:
        up = Upstreams()
        body = Body(length=0)
        result = up.request(b"PUT", b"/x", None, body)
        transport = up.connect()
        self.assertEqual(header_values(transport.value(), b"content-length"), [b"0"])
        body.finish()
        up.answer(OK)
        self.assertEqual(self.successResultOf(result).code, 200)
        self.assertFalse(transport.disconnecting)

    def test_query_without_a_path(self) -> None:
        up = Upstreams()
        up.agent.request(b"GET", ORIGIN + b"?a=b")
        transport = up.connect()
        self.assertEqual(head(transport.value())[0], b"GET /?a=b HTTP/1.1")
        self.assertEqual(header_values(transport.value(), b"host"), [b"127.0.0.1:11434"])


class ResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()
        self.result = self.up.request()
        self.transport = self.up.connect()

    def test_code_phrase_headers_and_length(self) -> None:
        self.assertNoResult(self.result)
        self.up.answer(b"HTTP/1.1 418 I'm a teapot\r\nContent-Type: application/json\r\n")
        self.assertNoResult(self.result)  # not before the head is whole
        self.up.answer(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 5\r\n\r\n")
        response = self.successResultOf(self.result)
        self.assertEqual(response.code, 418)
        self.assertEqual(response.phrase, b"I'm a teapot")
        self.assertEqual(response.version, (b"HTTP", 1, 1))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.length, 5)
        body = Collect()
        response.deliverBody(body)
        self.up.answer(b"ab")
        self.up.answer(b"cde")
        self.assertEqual(body.pieces, [b"ab", b"cde"])
        body.assert_done()

    def test_chunked_body_in_pieces(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = self.successResultOf(self.result)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = Collect()
        response.deliverBody(body)
        self.up.answer(b"5\r\nfirst\r\n")
        self.assertEqual(body.pieces, [b"first"])
        self.up.answer(b"6\r\nsecond\r\n5\r\nth")
        self.assertEqual(body.body, b"firstsecondth")
        self.assertIsNone(body.ended)
        self.up.answer(b"ird\r\n0\r\n")
        self.assertIsNone(body.ended)  # the last chunk's trailer section is still to come
        self.up.answer(b"\r\n")
        self.assertEqual(body.body, b"firstsecondthird")
        body.assert_done()
        self.assertFalse(self.transport.disconnecting)  # kept for another request

    def test_body_before_deliverBody_is_kept_and_reading_paused(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(self.result)
        self.assertEqual(self.transport.producerState, "paused")  # nobody reads it yet
        self.up.answer(b" you")
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.body, b"hello you")
        self.assertIsNone(body.ended)
        self.assertEqual(self.transport.producerState, "producing")
        self.up.answer(b"!")
        self.assertEqual(body.body, b"hello you!")
        body.assert_done()

    def test_whole_body_before_deliverBody(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        response = self.successResultOf(self.result)
        # The response is whole: reading goes on (the connection is idle), body kept.
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.transport.disconnecting)
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.body, b"hello")
        body.assert_done()

    def test_pause_during_early_delivery_is_kept(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        response = self.successResultOf(self.result)
        body = Collect(pause_each=True)
        response.deliverBody(body)  # it pauses as it gets "hello"
        self.assertEqual(body.body, b"hello")
        self.assertEqual(self.transport.producerState, "paused")

    def test_body_until_the_connection_ends(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
        response = self.successResultOf(self.result)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = Collect()
        response.deliverBody(body)
        self.up.answer(b" more")
        self.assertIsNone(body.ended)
        self.up.lose()
        self.assertEqual(body.body, b"some more")
        assert body.ended is not None
        body.ended.trap(PotentialDataLoss)

    def test_connection_lost_mid_body(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        body = Collect()
        self.successResultOf(self.result).deliverBody(body)
        self.up.lose(reason=error.ConnectionLost())
        self.assertEqual(body.body, b"abc")
        assert body.ended is not None
        body.ended.trap(ResponseFailed)
        assert isinstance(body.ended.value, ResponseFailed)
        self.assertTrue(body.ended.value.reasons[0].check(error.ConnectionLost))

    def test_connection_closed_mid_chunked_body(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        body = Collect()
        self.successResultOf(self.result).deliverBody(body)
        self.up.lose()  # cleanly, but before the last chunk
        assert body.ended is not None
        body.ended.trap(ResponseFailed)

    def test_interim_100_continue_is_skipped(self) -> None:
        self.up.answer(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n")
        self.assertNoResult(self.result)
        self.up.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        response = self.successResultOf(self.result)
        self.assertEqual((response.code, response.phrase), (201, b"Created"))
        self.assertIsNone(response.headers.getRawHeaders(b"x-interim"))
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.body, b"ok")
        body.assert_done()
        self.assertFalse(self.transport.disconnecting)

    def test_interim_answer_in_the_same_packet(self) -> None:
        self.up.answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        )
        response = self.successResultOf(self.result)
        self.assertEqual(response.code, 200)
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.body, b"{}")


class NoBodyTests(SynchronousTestCase):
    def test_head_gets_no_body_and_the_connection_is_reused(self) -> None:
        up = Upstreams()
        result = up.request(b"HEAD", b"/")
        transport = up.connect()
        self.assertEqual(head(transport.value())[0], b"HEAD / HTTP/1.1")
        up.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n\r\n")
        response = self.successResultOf(result)
        self.assertEqual(response.length, 0)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"17"])
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.pieces, [])
        body.assert_done()
        self.assertFalse(transport.disconnecting)

        transport.clear()
        second = up.request(b"GET", b"/")
        self.assertEqual(up.attempts, 1)
        self.assertEqual(head(transport.value())[0], b"GET / HTTP/1.1")
        up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nOllama is running")
        body = Collect()
        self.successResultOf(second).deliverBody(body)
        self.assertEqual(body.body, b"Ollama is running")
        body.assert_done()

    def test_head_answer_without_a_length_keeps_the_connection(self) -> None:
        up = Upstreams()
        result = up.request(b"HEAD", b"/")
        transport = up.connect()
        up.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        body.assert_done()
        self.assertFalse(transport.disconnecting)

    def test_204_gets_no_body_and_the_connection_is_reused(self) -> None:
        up = Upstreams()
        result = up.request(b"DELETE", b"/api/delete")
        transport = up.connect()
        up.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        response = self.successResultOf(result)
        self.assertEqual((response.code, response.length), (204, 0))
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(body.pieces, [])
        body.assert_done()
        self.assertFalse(transport.disconnecting)
        up.request()
        self.assertEqual(up.attempts, 1)

    def test_304_gets_no_body(self) -> None:
        up = Upstreams()
        result = up.request()
        transport = up.connect()
        up.answer(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
        response = self.successResultOf(result)
        self.assertEqual(response.length, 0)
        body = Collect()
        response.deliverBody(body)
        body.assert_done()
        self.assertFalse(transport.disconnecting)


class KeepAliveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()

    def exchange(self, answer: bytes = OK) -> Collect:
        """One request answered on the latest connection; its body read whole."""
        result = self.up.request()
        if self.up.attempts > self.up.handled:
            self.up.connect()
        self.up.answer(answer)
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        return body

    def test_second_request_reuses_the_connection(self) -> None:
        self.exchange()
        transport = self.up.transports[0]
        transport.clear()
        second = self.up.request(b"GET", b"/api/ps", Headers({b"X-Second": [b"1"]}))
        self.assertEqual(self.up.attempts, 1)  # no new connection
        self.assertEqual(head(transport.value())[0], b"GET /api/ps HTTP/1.1")
        self.assertEqual(header_values(transport.value(), b"x-second"), [b"1"])
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        body = Collect()
        self.successResultOf(second).deliverBody(body)
        self.assertEqual(body.body, b"second")
        body.assert_done()
        self.assertFalse(transport.disconnecting)

    def test_connections_are_kept_per_origin(self) -> None:
        self.exchange()
        self.up.agent.request(b"GET", b"http://127.0.0.1:11435/api/tags")
        self.assertEqual(self.up.attempts, 2)
        self.assertEqual(self.up.reactor.tcpClients[1][:2], ("127.0.0.1", 11435))

    def test_connection_close_closes_it(self) -> None:
        body = self.exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        body.assert_done()
        self.assertTrue(self.up.transports[0].disconnecting)
        self.assertFalse(self.up.transports[0].disconnected)  # closed, not aborted
        self.up.lose(0)
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_http_1_0_answer_closes_it(self) -> None:
        body = self.exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(body.body, b"{}")
        body.assert_done()
        self.assertTrue(self.up.transports[0].disconnecting)
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_idle_connection_is_closed_after_the_idle_timeout(self) -> None:
        self.exchange()
        transport = self.up.transports[0]
        self.up.reactor.advance(49.9)
        self.assertFalse(transport.disconnecting)
        self.up.reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.up.request()  # not on the closing connection, even before it is lost
        self.assertEqual(self.up.attempts, 2)
        self.up.lose(0)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])

    def test_reuse_stops_the_idle_timer(self) -> None:
        self.exchange()
        transport = self.up.transports[0]
        self.up.reactor.advance(40)
        result = self.up.request()
        self.assertEqual(self.up.attempts, 1)
        self.up.reactor.advance(30)  # busy with a slow answer meanwhile
        self.assertFalse(transport.disconnecting)
        self.up.answer(OK)
        self.successResultOf(result).deliverBody(Collect())
        self.up.reactor.advance(49)  # a fresh idle time from the second answer on
        self.assertFalse(transport.disconnecting)
        self.up.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_idle_connection_closed_by_the_upstream_is_forgotten(self) -> None:
        self.exchange()
        self.up.lose(0)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_unasked_bytes_on_an_idle_connection_abort_it(self) -> None:
        self.exchange()
        transport = self.up.transports[0]
        self.up.answer(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnected)
        # A real transport reports the abort later (callLater(0)): a request made before
        # then must not be sent on the aborted connection.
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_at_most_max_idle_connections_per_origin(self) -> None:
        up = Upstreams(max_idle=2)
        results = [up.request() for _ in range(3)]
        transports = [up.connect() for _ in range(3)]
        for index in range(3):
            up.answer(OK, index)
            self.successResultOf(results[index]).deliverBody(Collect())
        self.assertEqual([t.disconnecting for t in transports], [False, False, True])
        transports[0].clear()
        transports[1].clear()
        up.request()
        up.request()
        self.assertEqual(up.attempts, 3)  # both idle ones reused
        self.assertNotEqual(transports[0].value(), b"")
        self.assertNotEqual(transports[1].value(), b"")
        up.request()
        self.assertEqual(up.attempts, 4)

    def test_a_second_answer_never_asked_for_makes_it_unusable(self) -> None:
        body = self.exchange(OK)
        self.up.answer(OK)  # later, unasked
        self.assertTrue(self.up.transports[0].disconnected)
        self.up.lose(0, error.ConnectionAborted())
        self.assertEqual(body.body, b"{}")
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_a_second_answer_in_the_same_packet_does_not_replace_the_first(self) -> None:
        result = self.up.request()
        transport = self.up.connect()
        body = Collect()
        result.addCallback(lambda response: response.deliverBody(body))  # at once
        self.up.answer(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
        self.assertEqual(body.body, b"{}")
        body.assert_done()
        self.assertTrue(transport.disconnecting)
        self.up.request()
        self.assertEqual(self.up.attempts, 2)


class FailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()

    def test_connection_refused(self) -> None:
        result = self.up.request()
        self.up.refuse()
        self.failureResultOf(result, error.ConnectionRefusedError)

    def test_malformed_response(self) -> None:
        result = self.up.request()
        transport = self.up.connect()
        self.up.answer(b"HTTP/1.1 2x0 OK\r\n\r\n")
        failure = self.failureResultOf(result, ResponseFailed)
        self.assertTrue(failure.value.reasons)
        self.assertTrue(transport.disconnected)  # aborted
        self.up.lose(reason=error.ConnectionAborted())  # nothing more happens
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_malformed_chunk_fails_the_body(self) -> None:
        result = self.up.request()
        transport = self.up.connect()
        self.up.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        self.up.answer(b"zz\r\n")
        self.assertEqual(body.body, b"ok")
        assert body.ended is not None
        body.ended.trap(ResponseFailed)
        self.assertTrue(transport.disconnected)

    def test_connection_lost_before_any_byte(self) -> None:
        result = self.up.request()
        self.up.connect()
        self.up.lose(reason=error.ConnectionLost())
        failure = self.failureResultOf(result, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(error.ConnectionLost))
        self.assertEqual(self.up.attempts, 1)  # a new connection is not retried

    def test_connection_lost_within_the_head(self) -> None:
        result = self.up.request()
        self.up.connect()
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-")
        self.up.lose()
        self.failureResultOf(result, ResponseFailed)

    def reuse(self) -> StringTransport:
        """One exchange, leaving its connection idle for the next request."""
        result = self.up.request()
        transport = self.up.connect()
        self.up.answer(OK)
        self.successResultOf(result).deliverBody(Collect())
        transport.clear()
        return transport

    def test_kept_alive_connection_closed_before_answering_a_get_is_retried(self) -> None:
        first = self.reuse()
        result = self.up.request(b"GET", b"/api/version")
        self.assertEqual(head(first.value())[0], b"GET /api/version HTTP/1.1")
        self.up.lose(0)  # the upstream had closed it meanwhile
        self.assertNoResult(result)
        self.assertEqual(self.up.attempts, 2)
        second = self.up.connect()
        self.assertEqual(head(second.value())[0], b"GET /api/version HTTP/1.1")
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n0.12")
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        self.assertEqual(body.body, b"0.12")

    def test_retried_once_only(self) -> None:
        self.reuse()
        result = self.up.request()
        self.up.lose(0)
        self.up.connect()
        self.up.lose(1)
        self.failureResultOf(result, ResponseNeverReceived)
        self.assertEqual(self.up.attempts, 2)

    def test_post_with_a_body_is_not_retried(self) -> None:
        first = self.reuse()
        body = Body(length=2)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        self.assertEqual(head(first.value())[0], b"POST /api/chat HTTP/1.1")
        body.write(b"{}")
        body.finish()
        self.up.lose(0)
        self.failureResultOf(result, ResponseNeverReceived)
        self.assertEqual(self.up.attempts, 1)

    def test_bodyless_post_is_not_retried(self) -> None:
        self.reuse()
        result = self.up.request(b"POST", b"/api/pull")
        self.up.lose(0)
        self.failureResultOf(result, ResponseNeverReceived)
        self.assertEqual(self.up.attempts, 1)  # POST is not idempotent, body or not

    def test_kept_alive_connection_lost_after_some_answer_is_not_retried(self) -> None:
        self.reuse()
        result = self.up.request()
        self.up.answer(b"HTTP/1.1 200")
        self.up.lose(0)
        self.failureResultOf(result, ResponseFailed)
        self.assertEqual(self.up.attempts, 1)

    def test_failed_body_aborts(self) -> None:
        body = Body(length=5)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        body.finished.errback(Failure(ValueError("the client went away")))
        self.assertTrue(transport.disconnected)
        self.up.lose(reason=error.ConnectionAborted())
        self.failureResultOf(result, ResponseNeverReceived)


class CancelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()

    def test_cancel_while_connecting(self) -> None:
        result = self.up.request()
        result.cancel()
        self.assertTrue(self.up.reactor.connectors[0].stoppedConnecting)
        self.failureResultOf(result, error.ConnectingCancelledError)  # as Twisted's Agent

    def test_cancel_while_waiting_for_the_answer(self) -> None:
        result = self.up.request()
        transport = self.up.connect()
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.assertTrue(transport.disconnected)
        self.up.lose(reason=error.ConnectionAborted())
        self.assertEqual(self.up.attempts, 1)

    def test_cancel_on_a_reused_connection_is_not_retried(self) -> None:
        first = self.up.request()
        self.up.connect()
        self.up.answer(OK)
        self.successResultOf(first).deliverBody(Collect())
        result = self.up.request()
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.assertTrue(self.up.transports[0].disconnected)
        self.up.lose(0, error.ConnectionAborted())
        self.assertEqual(self.up.attempts, 1)

    def test_cancel_after_the_answer_does_nothing(self) -> None:
        result = self.up.request()
        transport = self.up.connect()
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        response = self.successResultOf(result)
        result.cancel()
        self.assertFalse(transport.disconnected)
        body = Collect()
        response.deliverBody(body)
        self.up.answer(b"{}")
        self.assertEqual(body.body, b"{}")


class BackpressureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()
        result = self.up.request()
        self.transport = self.up.connect()
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        self.body = Collect()
        self.successResultOf(result).deliverBody(self.body)
        self.producer: Any = self.body.transport

    def test_pause_and_resume(self) -> None:
        self.assertEqual(self.transport.producerState, "producing")
        self.producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.producer.pauseProducing()
        self.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_stop_aborts_and_nothing_more_is_delivered(self) -> None:
        self.up.answer(b"ab")
        self.producer.stopProducing()
        self.assertTrue(self.transport.disconnected)
        self.up.answer(b"cd")
        self.assertEqual(self.body.pieces, [b"ab"])
        self.up.lose(reason=error.ConnectionAborted())
        self.assertEqual(self.body.pieces, [b"ab"])
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_pause_in_force_at_the_end_is_lifted_before_reuse(self) -> None:
        self.producer.pauseProducing()
        self.up.answer(b"abcdef")  # was already on its way
        assert self.body.ended is not None
        self.body.ended.trap(ResponseDone)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.transport.disconnecting)
        self.up.request()
        self.assertEqual(self.up.attempts, 1)
        self.assertEqual(self.transport.producerState, "producing")

    def test_calls_after_the_end_do_nothing(self) -> None:
        self.up.answer(b"abcdef")
        second = self.up.request()  # on the same connection
        self.assertEqual(self.up.attempts, 1)
        self.producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.producer.stopProducing()
        self.assertFalse(self.transport.disconnected)
        self.up.answer(OK)
        self.assertEqual(self.successResultOf(second).code, 200)


class CloseCachedConnectionsTests(SynchronousTestCase):
    def test_idle_connections_are_closed_and_waited_for(self) -> None:
        up = Upstreams()
        results = [up.request() for _ in range(2)]
        transports = [up.connect() for _ in range(2)]
        for index in range(2):
            up.answer(OK, index)
            self.successResultOf(results[index]).deliverBody(Collect())
        closed = up.agent.closeCachedConnections()
        self.assertEqual([t.disconnecting for t in transports], [True, True])
        self.assertFalse(transports[0].disconnected)  # closed cleanly
        self.assertNoResult(closed)
        up.lose(0)
        self.assertNoResult(closed)
        up.lose(1)
        self.assertIsNone(self.successResultOf(closed))
        self.assertEqual(up.reactor.getDelayedCalls(), [])  # no idle timers left

    def test_with_nothing_idle(self) -> None:
        up = Upstreams()
        self.assertIsNone(self.successResultOf(up.agent.closeCachedConnections()))

    def test_a_response_ending_afterwards_closes_its_connection(self) -> None:
        up = Upstreams()
        result = up.request()
        transport = up.connect()
        up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        closed = up.agent.closeCachedConnections()
        self.assertIsNone(self.successResultOf(closed))  # it did not wait for busy ones
        self.assertFalse(transport.disconnecting)
        up.answer(b"{}")
        body.assert_done()
        self.assertTrue(transport.disconnecting)
        up.request()
        self.assertEqual(up.attempts, 2)


class BodyLengthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()

    def test_body_longer_than_declared_aborts(self) -> None:
        body = Body(length=4)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        body.write(b"ab")
        self.assertFalse(transport.disconnected)
        body.write(b"cdef")
        self.assertTrue(transport.disconnected)
        self.assertEqual(after_head(transport.value()), b"ab")  # the excess is not sent
        body.finish()
        self.up.lose(reason=error.ConnectionAborted())
        self.failureResultOf(result, ResponseNeverReceived)
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_body_shorter_than_declared_leaves_the_connection_unused(self) -> None:
        body = Body(length=10)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        body.write(b"abc")
        self.up.answer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad")
        reader = Collect()
        self.successResultOf(result).deliverBody(reader)
        self.assertEqual(reader.body, b"bad")
        self.assertIsNone(reader.ended)  # not before the body is sent
        body.finish()  # it ends short of its Content-Length
        self.assertTrue(transport.disconnected)
        self.assertIsNone(transport.producer)
        self.up.lose(reason=error.ConnectionAborted())
        reader.assert_done()
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_response_before_the_body_is_sent_waits_for_it(self) -> None:
        body = Body(length=4)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        body.write(b"ab")
        self.up.answer(OK)
        reader = Collect()
        self.successResultOf(result).deliverBody(reader)
        self.assertEqual(reader.body, b"{}")
        self.up.request()
        self.assertEqual(self.up.attempts, 2)  # still sending: not free for another
        body.write(b"cd")
        body.finish()
        reader.assert_done()
        self.assertFalse(transport.disconnected)
        self.assertFalse(transport.disconnecting)
        self.assertIsNone(transport.producer)
        transport.clear()
        self.up.request()
        self.assertEqual(self.up.attempts, 2)  # this one went on the freed connection
        self.assertEqual(head(transport.value())[0], b"GET /api/tags HTTP/1.1")


class StrayAnswerTests(SynchronousTestCase):
    def test_101_fails_the_call_without_raising(self) -> None:
        """httptools raises its own exception for a 101; it must not reach the reactor."""
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        self.failureResultOf(result, ResponseFailed)

    def test_the_start_of_an_unasked_answer_makes_the_connection_unusable(self) -> None:
        up = Upstreams()
        first = up.request()
        transport = up.connect()
        up.answer(OK + b"HTTP/1.1 200 OK\r\n")  # only the first line of a stray answer
        self.successResultOf(first).deliverBody(Collect())
        self.assertTrue(transport.disconnecting, "closed, not kept")
        up.request()
        self.assertEqual(up.attempts, 2, "the next request gets a new connection")


class _TCPLikeTransport(StringTransport):
    """Aborts as twisted.internet.tcp does: reading stops, ``disconnecting`` stays False
    (connectionLost comes a turn later); notes reading resumed after that."""

    aborted = False
    resumed_after_abort = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.resumed_after_abort = self.resumed_after_abort or self.aborted
        super().resumeProducing()


class StopDuringEarlyDeliveryTests(SynchronousTestCase):
    def test_reading_stays_stopped(self) -> None:
        """Body that came before deliverBody, and a protocol that stops at once (the
        proxy's _Drop): the aborted connection is not read from again."""
        up = Upstreams()
        result = up.request()
        host, port, factory, _, _ = up.reactor.tcpClients[0]
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = _TCPLikeTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")

        class Stop(Collect):
            def connectionMade(self) -> None:
                transport: Any = self.transport
                transport.stopProducing()

        self.successResultOf(result).deliverBody(Stop())
        self.assertTrue(transport.aborted)
        self.assertFalse(transport.resumed_after_abort)
