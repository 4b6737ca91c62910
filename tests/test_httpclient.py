"""ollana.httpclient's UpstreamAgent in memory: upstream connections on a MemoryReactorClock,
each one a StringTransport, answered by feeding bytes to its protocol. (The TLS handshake
timer is also tried on real TLS over loopback, at the end.)

Flow control is asserted through the transports' ``producerState`` (reading from the
upstream) and ``producer`` (the request body), as Twisted's own HTTP tests do.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import alsoProvides, implementer

from ollana import tls
from ollana.httpclient import (
    Call,
    Connection,
    ResponseHeadTimeout,
    ResponseHeadTooLarge,
    SwitchedProtocols,
    TLSHandshakeTimeout,
    UpstreamAgent,
    split_origin,
)
from ollana.upstream import UpstreamEndpoints, describe_error, make_agent
from tests.support.http import FakeUpstreams, after_head, head, header_values

reactor: Any = _reactor  # for the loopback tests only
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


class Upstreams(FakeUpstreams):
    """An UpstreamAgent and the upstream connections it opens; make_agent's unless a
    max_idle or a limit (an UpstreamAgent argument) is given."""

    def __init__(self, max_idle: int | None = None, **limits: Any) -> None:
        super().__init__(MemoryReactorClock())
        if max_idle is None and not limits:
            self.agent = make_agent(self.reactor, connect_timeout=5)
        else:
            endpoints = UpstreamEndpoints(self.reactor, 5)
            self.agent = UpstreamAgent(
                self.reactor, endpoints, max_idle or 64, idle_timeout=50, **limits
            )

    def request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/api/tags",
        headers: Headers | None = None,
        body: Body | None = None,
    ) -> Deferred[Any]:  # of an UpstreamResponse
        return self.agent.request(method, ORIGIN + path, headers, body)


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

    def test_an_interim_answer_with_a_body_is_read_past(self) -> None:
        """llhttp reads a body on an interim answer that says it has one (a 199 with a
        Content-Length); it is not ours, the final answer is read whole, in any number of
        pieces, and the connection is not kept."""
        self.up.answer(b"HTTP/1.1 199 Odd\r\nContent-Length: 3\r\n\r\nabc")
        self.assertNoResult(self.result)
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nde")
        body = Collect()
        self.successResultOf(self.result).deliverBody(body)
        self.up.answer(b"fg")
        self.assertEqual(body.body, b"defg")
        body.assert_done()
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)  # closed, not aborted


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

    def test_a_connection_dropped_as_its_answer_completes_is_not_reused(self) -> None:
        """The body writer aborts (as the proxy does when it abandons a body) while the
        packet that completes the answer is read: the answer ends, and the dropped
        connection is not handed out again."""
        body = Body(length=2)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        body.write(b"{}")
        body.finish()

        class Abandon(Collect):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                body.consumer.abort()

        reader = Abandon()
        result.addCallback(lambda response: response.deliverBody(reader))
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        reader.assert_done()
        self.assertTrue(transport.disconnected)
        self.up.request()
        self.assertEqual(self.up.attempts, 2)


class StrayAnswerTests(SynchronousTestCase):
    def test_an_unasked_answer_during_an_upload_is_not_read(self) -> None:
        """An answer came early and whole; while the body is still being sent, the bytes of
        another one (endless headers, say) are neither parsed nor kept."""
        up = Upstreams()
        body = Body(length=4)
        result = up.request(b"POST", b"/api/chat", None, body)
        transport = up.connect()
        up.answer(OK + b"HTTP/1.1 200 OK\r\n")
        reader = Collect()
        self.successResultOf(result).deliverBody(reader)
        for _ in range(100):
            up.answer(b"X-Endless: " + b"e" * 1000)
        up.answer(b"\x00 not HTTP")  # were it parsed, an error would drop the connection
        self.assertFalse(transport.disconnecting)
        body.write(b"abcd")
        body.finish()
        reader.assert_done()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)  # closed, not aborted

    def test_101_fails_the_call_without_raising(self) -> None:
        """httptools raises its own exception for a 101 (its message only an error code,
        "69"); it must not reach the reactor, and the failure says what happened."""
        up = Upstreams()
        result = up.request()
        transport = up.connect()
        up.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        failure = self.failureResultOf(result, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(SwitchedProtocols))
        self.assertEqual(
            describe_error(failure.value),
            "upstream switched protocols (101), which cannot be relayed",
        )
        self.assertTrue(transport.disconnected)
        up.request()
        self.assertEqual(up.attempts, 2)

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


class StateTests(SynchronousTestCase):
    """The states and transitions Connection's docstring lists, walked by the events that
    make them. (A request with a body gives its connection: ``body.consumer.connection``.)"""

    def setUp(self) -> None:
        self.up = Upstreams()

    def post(self, length: int = 2) -> tuple[Body, Deferred[Any], StringTransport, Connection]:
        body = Body(length=length)
        result = self.up.request(b"POST", b"/api/chat", None, body)
        transport = self.up.connect()
        return body, result, transport, body.consumer.connection

    def assert_state(self, connection: Connection, state: str, answer: str | None) -> None:
        self.assertEqual((connection.state, connection.answer), (state, answer))

    def test_connecting_then_idle(self) -> None:
        connection = Connection(self.up.agent, ORIGIN)
        self.assert_state(connection, "CONNECTING", None)
        self.assertFalse(connection.usable)
        connection.makeConnection(StringTransport())
        self.assert_state(connection, "IDLE", None)
        self.assertTrue(connection.usable)

    def test_an_exchange_with_an_interim_answer(self) -> None:
        body, result, transport, connection = self.post()
        self.assert_state(connection, "BUSY", "WAITING")
        self.assertTrue(connection.usable)
        for data, answer in [
            (b"\r\n", "STARTED"),  # blank lines before an answer (llhttp skips them)
            (b"HTTP/1.1 100 Continue\r\n", "HEAD"),
            (b"\r\n", "STARTED"),  # the interim answer has ended
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "HEAD"),
            (b"\r\n", "BODY"),
            (b"{}", "WHOLE"),  # before the request's body is all sent
        ]:
            self.up.answer(data)
            self.assert_state(connection, "BUSY", answer)
        body.write(b"{}")
        body.finish()
        self.assert_state(connection, "IDLE", None)  # kept for another request
        self.up.reactor.advance(50)  # idle too long
        self.assert_state(connection, "CLOSING", None)
        self.assertFalse(connection.usable)
        self.up.lose()
        self.assert_state(connection, "LOST", None)

    def test_the_answer_to_a_head_request_is_whole_with_its_head(self) -> None:
        body, result, transport, connection = self.post()
        body.write(b"{}")
        body.finish()
        self.up.answer(OK)
        self.assert_state(connection, "IDLE", None)
        self.up.request(b"HEAD", b"/")
        self.assert_state(connection, "BUSY", "WAITING")
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n")
        self.assert_state(connection, "IDLE", None)

    def test_a_stray_answer_closes_it_once_the_request_is_sent(self) -> None:
        body, result, transport, connection = self.post()
        self.up.answer(OK + b"HTTP/1.1 200 OK\r\n")
        self.assert_state(connection, "BUSY", "STRAY")
        body.write(b"{}")
        body.finish()
        self.assert_state(connection, "CLOSING", None)

    def test_aborting_keeps_the_answer_until_the_connection_is_gone(self) -> None:
        body, result, transport, connection = self.post()
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        reader = Collect()
        self.successResultOf(result).deliverBody(reader)
        reader.transport.stopProducing()  # type: ignore[union-attr]
        self.assert_state(connection, "ABORTING", "BODY")
        self.assertFalse(connection.usable)
        self.up.answer(b"defg")  # under way when it was dropped: not read
        self.assertIsNone(reader.ended)
        self.up.lose(reason=error.ConnectionAborted())
        self.assert_state(connection, "LOST", None)
        self.assertEqual(reader.body, b"abc")
        assert reader.ended is not None
        reader.ended.trap(ResponseFailed)

    def test_unasked_bytes_on_an_idle_connection_abort_it(self) -> None:
        connection = Connection(self.up.agent, ORIGIN)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assert_state(connection, "ABORTING", None)
        self.assertTrue(transport.disconnected)

    def test_a_request_is_sent_on_an_idle_connection_only(self) -> None:
        body, result, transport, connection = self.post()
        sent = transport.value()
        with self.assertRaises(RuntimeError):
            connection.send(Call(b"GET", b"/", None, None), reused=True)
        self.assert_state(connection, "BUSY", "WAITING")
        self.assertEqual(transport.value(), sent)
        connection.abort()
        with self.assertRaises(RuntimeError):
            connection.send(Call(b"GET", b"/", None, None), reused=True)
        self.assertEqual(transport.value(), sent)

    def test_a_busy_connection_is_not_closed(self) -> None:
        body, result, transport, connection = self.post()
        with self.assertRaises(RuntimeError):
            connection.close()
        self.assert_state(connection, "BUSY", "WAITING")
        self.assertFalse(transport.disconnecting)

    def test_closing_or_aborting_again_does_nothing_more(self) -> None:
        body, result, transport, connection = self.post()
        body.write(b"{}")
        body.finish()
        self.up.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        self.assert_state(connection, "CLOSING", None)
        closed = connection.close()
        connection.abort()
        self.assert_state(connection, "ABORTING", None)
        self.assertTrue(transport.disconnected)
        connection.abort()
        again = connection.close()
        self.assert_state(connection, "ABORTING", None)
        self.assertNoResult(closed)
        self.up.lose(reason=error.ConnectionAborted())
        self.assert_state(connection, "LOST", None)
        self.assertIsNone(self.successResultOf(closed))
        self.assertIsNone(self.successResultOf(again))
        self.assertIsNone(self.successResultOf(connection.close()))


def head_of(size: int, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A response head (of a 2-byte body) of exactly size bytes, padded in one header."""
    start = status + b"\r\nContent-Length: 2\r\nX-Pad: "
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


def with_headers(count: int) -> bytes:
    """A response head (of a 2-byte body) with count header lines."""
    lines = [b"X-Header-%d: v\r\n" % index for index in range(count - 1)]
    return b"HTTP/1.1 200 OK\r\n" + b"".join(lines) + b"Content-Length: 2\r\n\r\n"


class HeadSizeTests(SynchronousTestCase):
    def assert_refused(self, up: Upstreams, result: Deferred[Any], message: str) -> None:
        """The call failed for message, and its connection was dropped, not reused."""
        failure = self.failureResultOf(result, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(ResponseHeadTooLarge))
        self.assertEqual(describe_error(failure.value), message)
        self.assertTrue(up.transports[-1].disconnected)
        up.answer(OK)  # what was under way is not read
        up.lose(reason=error.ConnectionAborted())
        up.request()
        self.assertEqual(up.attempts, len(up.transports) + 1)

    def test_a_head_of_exactly_the_limit_is_read(self) -> None:
        up = Upstreams()
        result = up.request()
        transport = up.connect()
        up.answer(head_of(65536) + b"{}")  # the body in the same packet is not counted
        body = Collect()
        self.successResultOf(result).deliverBody(body)
        self.assertEqual(body.body, b"{}")
        body.assert_done()
        self.assertFalse(transport.disconnecting)

    def test_one_byte_more_fails_the_call(self) -> None:
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(head_of(65537) + b"{}")
        self.assert_refused(up, result, "response head larger than 65536 bytes")

    def test_byte_by_byte_up_to_the_limit(self) -> None:
        up = Upstreams(max_head=100)
        result = up.request()
        up.connect()
        head = head_of(100)
        for index in range(100):
            up.answer(head[index : index + 1])
        self.assertEqual(self.successResultOf(result).code, 200)

    def test_byte_by_byte_over_the_limit(self) -> None:
        up = Upstreams(max_head=100)
        result = up.request()
        up.connect()
        head = head_of(101)
        for index in range(100):
            up.answer(head[index : index + 1])
        self.assertNoResult(result)
        up.answer(head[100:])
        self.assert_refused(up, result, "response head larger than 100 bytes")

    def test_endless_headers(self) -> None:
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Endless: " + b"e" * 1011 + b"\r\n"  # 1 KiB
        for _ in range(63):
            up.answer(line)
        self.assertNoResult(result)  # 17 bytes short of 64 KiB
        up.answer(line)
        self.assert_refused(up, result, "response head larger than 65536 bytes")

    def test_endless_status_line(self) -> None:
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(b"HTTP/1.1 200 " + b"O" * 70000)
        self.assert_refused(up, result, "response head larger than 65536 bytes")

    def test_interim_heads_count(self) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        up = Upstreams(max_head=200)
        fits = up.request()
        up.connect()
        up.answer(interim)
        up.answer(head_of(200 - len(interim)) + b"{}")
        self.assertEqual(self.successResultOf(fits).code, 200)

        up = Upstreams(max_head=200)
        over = up.request()
        up.connect()
        up.answer(interim)
        up.answer(head_of(201 - len(interim)) + b"{}")
        self.assert_refused(up, over, "response head larger than 200 bytes")

    def test_an_interim_head_of_exactly_the_limit_leaves_no_room(self) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        up = Upstreams(max_head=len(interim))
        result = up.request()
        up.connect()
        up.answer(interim)
        self.assertNoResult(result)
        up.answer(b"H")
        self.assert_refused(up, result, f"response head larger than {len(interim)} bytes")

    def test_256_header_lines_are_read(self) -> None:
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(with_headers(256) + b"{}")
        response = self.successResultOf(result)
        self.assertEqual(len(list(response.headers.getAllRawHeaders())), 256)

    def test_257_fail_the_call(self) -> None:
        up = Upstreams()
        result = up.request()
        up.connect()
        up.answer(with_headers(257) + b"{}")
        self.assert_refused(up, result, "response head has more than 256 header lines")

    def test_a_limit_reached_on_a_reused_connection_is_not_retried(self) -> None:
        up = Upstreams(max_head=100)
        first = up.request()
        up.connect()
        up.answer(OK)
        self.successResultOf(first).deliverBody(Collect())
        result = up.request()
        up.answer(head_of(101))
        self.assert_refused(up, result, "response head larger than 100 bytes")


class CountedTimers:
    """Counts the timers an agent starts on its reactor."""

    def __init__(self, case: SynchronousTestCase, reactor: MemoryReactorClock) -> None:
        self.started = 0
        call_later = reactor.callLater

        def counted(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
            self.started += 1
            return call_later(delay, f, *args, **kwargs)

        case.patch(reactor, "callLater", counted)


class HeadTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()
        self.timers = CountedTimers(self, self.up.reactor)
        self.result = self.up.request()
        self.transport = self.up.connect()

    def test_a_trickled_head_fails_the_call(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\n")
        self.up.reactor.advance(15)
        self.up.answer(b"Content-Type: text/plain\r\n")  # more of it does not help
        self.up.reactor.advance(14.9)
        self.assertNoResult(self.result)
        self.up.reactor.advance(0.1)
        failure = self.failureResultOf(self.result, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(ResponseHeadTimeout))
        self.assertEqual(describe_error(failure.value), "response head timed out after 30 s")
        self.assertTrue(self.transport.disconnected)
        self.up.lose(reason=error.ConnectionAborted())
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_the_first_byte_may_take_minutes(self) -> None:
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])
        self.up.reactor.advance(600)  # a model loading: not the head timer's business
        self.up.answer(OK)
        self.assertEqual(self.successResultOf(self.result).code, 200)

    def test_a_head_in_one_piece_starts_no_timer(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.successResultOf(self.result)
        self.assertEqual(self.timers.started, 0)

    def test_the_timer_stops_when_the_head_ends(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\nContent-")
        self.assertEqual(self.timers.started, 1)
        self.up.reactor.advance(29)
        self.up.answer(b"Length: 2\r\n\r\n")
        response = self.successResultOf(self.result)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])
        self.up.reactor.advance(60)  # the body may take its time
        body = Collect()
        response.deliverBody(body)
        self.up.answer(b"{}")
        body.assert_done()
        self.assertEqual(self.timers.started, 2)  # and the idle timer

    def test_each_head_has_its_own_time(self) -> None:
        """After a 100 Continue the real answer may take minutes (the body is read and a
        model loaded); its head is timed from its own first byte."""
        self.up.answer(b"HTTP/1.1 100 Cont")
        self.up.reactor.advance(29)
        self.up.answer(b"inue\r\n\r\n")
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])
        self.up.reactor.advance(300)
        self.up.answer(b"HTTP/1.1 200 OK\r\n")
        self.up.reactor.advance(29.9)
        self.assertNoResult(self.result)
        self.up.reactor.advance(0.1)
        self.failureResultOf(self.result, ResponseFailed)

    def test_a_head_begun_in_the_same_packet_as_an_interim_one_is_timed(self) -> None:
        self.up.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
        self.up.reactor.advance(30)
        self.failureResultOf(self.result, ResponseFailed)

    def test_the_timer_stops_when_the_connection_is_lost(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\n")
        self.up.lose()
        self.failureResultOf(self.result, ResponseFailed)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])

    def test_the_timer_stops_when_the_call_is_cancelled(self) -> None:
        self.up.answer(b"HTTP/1.1 200 OK\r\n")
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])


def tls_transport() -> StringTransport:
    """A transport that says it is TLS, as TLSMemoryBIOProtocol does (handshake or not)."""
    transport = StringTransport()
    alsoProvides(transport, ISSLTransport)
    return transport


class HandshakeTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams()
        self.result = self.up.request()

    def test_no_handshake_in_time_fails_the_call(self) -> None:
        transport = self.up.connect(transport=tls_transport())
        self.up.reactor.advance(4.9)
        self.assertNoResult(self.result)
        self.up.reactor.advance(0.1)
        failure = self.failureResultOf(self.result, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(TLSHandshakeTimeout))
        self.assertEqual(describe_error(failure.value), "TLS handshake timed out after 5 s")
        self.assertTrue(transport.disconnected)
        self.up.lose(reason=error.ConnectionAborted())
        self.up.request()
        self.assertEqual(self.up.attempts, 2)

    def test_the_handshake_timeout_is_the_connect_timeout(self) -> None:
        clock = MemoryReactorClock()
        agent = make_agent(clock, connect_timeout=2)
        result = agent.request(b"GET", ORIGIN + b"/")
        protocol: Any = clock.tcpClients[0][2].buildProtocol(None)
        protocol.makeConnection(tls_transport())
        clock.advance(2)
        failure = self.failureResultOf(result, ResponseNeverReceived)
        self.assertEqual(describe_error(failure.value), "TLS handshake timed out after 2 s")

    def test_a_completed_handshake_stops_the_timer(self) -> None:
        transport = self.up.connect(transport=tls_transport())
        self.up.reactor.advance(4.9)
        self.up.protocols[-1].handshakeCompleted()
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])
        self.up.reactor.advance(60)  # the answer may take its time
        self.up.answer(OK)
        self.assertEqual(self.successResultOf(self.result).code, 200)
        self.assertFalse(transport.disconnecting)

    def test_the_timer_stops_when_the_connection_is_lost(self) -> None:
        self.up.connect(transport=tls_transport())
        self.up.lose(reason=error.ConnectionLost())
        self.failureResultOf(self.result, ResponseNeverReceived)
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])

    def test_plain_tcp_has_no_handshake_timer(self) -> None:
        self.up.connect()
        self.assertEqual(self.up.reactor.getDelayedCalls(), [])


class PerOriginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = Upstreams(max_per_origin=2)

    def finish(self, index: int) -> None:
        """The answer to the request on connection index comes, whole, and is read."""
        self.up.answer(OK, index)

    def test_requests_beyond_the_cap_wait_their_turn(self) -> None:
        results = [self.up.request(b"GET", b"/%d" % n) for n in range(4)]
        self.assertEqual(self.up.attempts, 2)
        transports = [self.up.connect(), self.up.connect()]
        for transport in transports:
            transport.clear()
        self.up.answer(OK, 1)
        self.assertEqual(head(transports[1].value())[0], b"GET /2 HTTP/1.1")
        self.up.answer(OK, 0)
        self.assertEqual(head(transports[0].value())[0], b"GET /3 HTTP/1.1")
        self.up.answer(OK, 0)
        self.up.answer(OK, 1)
        self.assertEqual([self.successResultOf(r).code for r in results], [200] * 4)
        self.assertEqual(self.up.attempts, 2)

    def test_a_lost_connection_makes_room_for_a_new_one(self) -> None:
        first, _, third = [self.up.request() for _ in range(3)]
        self.up.connect()
        self.up.connect()
        self.up.lose(0, error.ConnectionLost())
        self.failureResultOf(first, ResponseNeverReceived)
        self.assertEqual(self.up.attempts, 3)
        self.up.connect()
        self.up.answer(OK)
        self.assertEqual(self.successResultOf(third).code, 200)

    def test_a_failed_attempt_makes_room(self) -> None:
        first, _, third = [self.up.request() for _ in range(3)]
        self.up.refuse()
        self.failureResultOf(first, error.ConnectionRefusedError)
        self.assertEqual(self.up.attempts, 3)

    def test_a_cancelled_attempt_makes_room(self) -> None:
        first, _, third = [self.up.request() for _ in range(3)]
        first.cancel()
        self.failureResultOf(first, error.ConnectingCancelledError)
        self.assertEqual(self.up.attempts, 3)

    def test_a_waiting_request_cancelled_leaves_the_queue(self) -> None:
        results = [self.up.request(b"GET", b"/%d" % n) for n in range(4)]
        transports = [self.up.connect(), self.up.connect()]
        results[2].cancel()
        self.failureResultOf(results[2], CancelledError)
        transports[0].clear()
        self.up.answer(OK, 0)
        self.assertEqual(head(transports[0].value())[0], b"GET /3 HTTP/1.1")
        transports[1].clear()
        self.up.answer(OK, 1)
        self.assertEqual(transports[1].value(), b"")  # nothing left waiting
        self.assertEqual(self.up.attempts, 2)
        self.assertEqual(self.up.agent._waiting, {})

    def test_idle_connections_count(self) -> None:
        results = [self.up.request() for _ in range(2)]
        self.up.connect()
        self.up.connect()
        self.up.answer(OK, 0)
        self.up.answer(OK, 1)
        for result in results:
            self.successResultOf(result).deliverBody(Collect())
        self.up.request()
        self.up.request()
        third = self.up.request()
        self.assertEqual(self.up.attempts, 2)
        self.up.reactor.advance(50)  # neither was idle that long
        self.assertNoResult(third)

    def test_an_idle_connection_closed_makes_room(self) -> None:
        first = self.up.request()
        self.up.connect()
        self.up.answer(OK)
        self.successResultOf(first).deliverBody(Collect())
        self.up.request()  # on the idle one
        self.up.request()
        third = self.up.request()
        self.assertEqual(self.up.attempts, 2)
        self.up.lose(0)  # closed before it answered: retried, in its place
        self.assertEqual(self.up.attempts, 3)
        self.assertNoResult(third)

    def test_other_origins_are_not_held_up(self) -> None:
        for _ in range(3):
            self.up.request()
        self.up.agent.request(b"GET", b"http://127.0.0.1:11435/")
        self.assertEqual(self.up.attempts, 3)

    def test_a_retry_takes_the_place_of_the_lost_connection(self) -> None:
        up = Upstreams(max_per_origin=1)
        first = up.request()
        up.connect()
        up.answer(OK)
        self.successResultOf(first).deliverBody(Collect())
        retried = up.request(b"GET", b"/retried")
        waiting = up.request(b"GET", b"/waiting")
        up.lose(0)
        self.assertEqual(up.attempts, 2)
        transport = up.connect()
        self.assertEqual(head(transport.value())[0], b"GET /retried HTTP/1.1")
        transport.clear()
        up.answer(OK)
        self.assertEqual(self.successResultOf(retried).code, 200)
        self.assertEqual(head(transport.value())[0], b"GET /waiting HTTP/1.1")
        up.answer(OK)
        self.assertEqual(self.successResultOf(waiting).code, 200)
        self.assertEqual(up.attempts, 2)

    def test_closing_lets_the_waiting_requests_go_out(self) -> None:
        """closeCachedConnections as Ollana stops: requests already made are served (they
        are being drained); a connection is closed once nothing waits for it."""
        up = Upstreams(max_per_origin=1)
        first = up.request()
        waiting = up.request()
        transport = up.connect()
        closed = up.agent.closeCachedConnections()
        self.assertIsNone(self.successResultOf(closed))
        up.answer(OK)
        self.successResultOf(first).deliverBody(Collect())
        self.assertFalse(transport.disconnecting)
        up.answer(OK)
        self.successResultOf(waiting).deliverBody(Collect())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(up.attempts, 1)

    def test_the_count_comes_back_to_nothing(self) -> None:
        results = [self.up.request() for _ in range(5)]  # 0 and 1 connecting, 3 waiting
        self.up.refuse()  # 0 fails; 2 connects
        self.up.connect()
        self.up.lose(0, error.ConnectionLost())  # 1 fails; 3 connects
        self.up.connect()
        self.up.answer(OK, 1)  # 2 answered; 4 on its connection
        self.up.connect()
        self.up.answer(OK, 2)  # 3 answered
        self.up.answer(OK, 1)  # 4 answered
        self.assertEqual(self.up.attempts, 4)
        self.failureResultOf(results[0], error.ConnectionRefusedError)
        self.failureResultOf(results[1], ResponseNeverReceived)
        self.assertEqual([self.successResultOf(r).code for r in results[2:]], [200] * 3)
        self.assertEqual(self.up.agent._opened, {ORIGIN: 2})  # both idle
        self.up.reactor.advance(50)
        self.up.lose(1)
        self.up.lose(2)
        self.assertEqual(self.up.agent._opened, {})
        self.assertEqual(self.up.agent._waiting, {})

    def test_the_default_cap_is_192(self) -> None:
        up = Upstreams()
        for _ in range(193):
            up.request()
        self.assertEqual(up.attempts, 192)

    def test_make_agent_takes_the_cap(self) -> None:
        clock = MemoryReactorClock()
        agent = make_agent(clock, connect_timeout=5, max_per_origin=3)
        for _ in range(4):
            agent.request(b"GET", ORIGIN + b"/")
        self.assertEqual(len(clock.tcpClients), 3)


class _Upstream(Protocol):
    """A loopback upstream's connection: silent, or answering OK after a delay."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.delay is not None and b"\r\n\r\n" in data:
            self.answer = reactor.callLater(self.delay, self.transport.write, OK)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.delay is not None and self.answer.active():
            self.answer.cancel()
        self.lost.callback(None)


class _Upstreams(Factory):
    """Makes _Upstream connections and keeps them, for the test to wait until they are gone."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.accepted: list[_Upstream] = []

    def buildProtocol(self, addr: Any) -> _Upstream:
        protocol = _Upstream(self.delay)
        self.accepted.append(protocol)
        return protocol


class LoopbackHandshakeTests(TestCase):
    """The handshake timer on real TLS (Twisted's TLSMemoryBIOProtocol) over loopback."""

    timeout = 10

    def agent(self, tls_for: Any) -> UpstreamAgent:
        endpoints = UpstreamEndpoints(reactor, 5, tls_for)
        agent = UpstreamAgent(reactor, endpoints, 1, idle_timeout=50, handshake_timeout=0.3)
        self.addCleanup(agent.closeCachedConnections)
        return agent

    def listen(self, delay: float | None, tls_options: Any = None) -> tuple[int, _Upstreams]:
        factory = _Upstreams(delay)
        if tls_options is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tls_options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    async def test_a_plain_port_that_never_answers_the_handshake(self) -> None:
        port, upstreams = self.listen(delay=None)
        agent = self.agent(lambda host, port: optionsForClientTLS("localhost"))
        started = reactor.seconds()
        with self.assertRaises(ResponseNeverReceived) as raised:
            await agent.request(b"GET", b"https://127.0.0.1:%d/" % port)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(describe_error(raised.exception), "TLS handshake timed out after 0.3 s")
        await upstreams.accepted[0].lost

    async def test_a_completed_handshake_lets_the_answer_take_longer(self) -> None:
        certificate = tls.ensure_self_signed(self.mktemp())
        port, upstreams = self.listen(delay=0.6, tls_options=certificate.server_options())
        agent = self.agent(lambda host, port: tls.pinned_client_tls(certificate.fingerprint, host))
        response = await agent.request(b"GET", b"https://127.0.0.1:%d/" % port)
        self.assertEqual(await readBody(response), b"{}")
        await agent.closeCachedConnections()
        await upstreams.accepted[0].lost


class SplitOriginTests(SynchronousTestCase):
    def test_origin_and_request_target(self) -> None:
        cases = {
            b"http://h:1/api/tags?q=1": (b"http://h:1", b"/api/tags?q=1"),
            b"http://h:1?q=/x": (b"http://h:1", b"/?q=/x"),
            b"http://h:1": (b"http://h:1", b"/"),
            b"http://h:1/": (b"http://h:1", b"/"),
            b"https://[::1]:2/a/b": (b"https://[::1]:2", b"/a/b"),
        }
        for uri, expected in cases.items():
            self.assertEqual(split_origin(uri), expected, uri)
