"""The streaming proxy in memory: a Site on a StringTransport, upstreams on a MemoryReactor.

Flow control is asserted the way Twisted's own HTTP tests do: through the transports'
``producerState``.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Sequence
from dataclasses import replace

from twisted.internet import defer, error
from twisted.internet.base import DelayedCall
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ollana.affinity import KEY_LIMIT, conversation_key, wants_key
from ollana.interfaces import IRouter
from ollana.site import MIN_BODY_RATE
from ollana.upstream import (
    Listing,
    LocalAnswer,
    Router,
    Upstream,
    UpstreamsFailed,
    Watcher,
)
from tests.support.fakes import capture_logs
from tests.support.http import (
    ProxyHarness,
    Scripted,
    head,
    header_values,
    producer,
)


class RequestForwardingTests(SynchronousTestCase):
    def test_method_path_query_and_headers(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(
            b"DELETE /api/delete?force=1&x=%2F HTTP/1.1\r\n"
            b"Host: localhost:11434\r\n"
            b"X-Custom: one\r\nX-Custom: two\r\n"
            b"Connection: keep-alive, X-Secret\r\nX-Secret: hop\r\n"
            b"Keep-Alive: 5\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
            b"Upgrade: h2c\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
        )
        upstream = proxy.connect()
        line, headers = head(upstream.value())
        self.assertEqual(line, b"DELETE /api/delete?force=1&x=%2F HTTP/1.1")
        sent = upstream.value()
        self.assertEqual(header_values(sent, b"host"), [b"127.0.0.1:11434"])
        self.assertEqual(header_values(sent, b"x-custom"), [b"one", b"two"])
        for hop in (b"x-secret", b"keep-alive", b"proxy-authorization", b"te", b"upgrade"):
            self.assertEqual(header_values(sent, hop), [], hop)
        self.assertEqual(header_values(sent, b"x-forwarded-for"), [b"203.0.113.9, 198.18.0.50"])
        self.assertEqual(header_values(sent, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(header_values(sent, b"via"), [b"1.1 ollana"])

    def test_absolute_form_target_becomes_a_path(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET http://localhost:11434/api/tags?a=b HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(head(upstream.value())[0], b"GET /api/tags?a=b HTTP/1.1")

    def test_absolute_form_without_a_path(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET http://localhost:11434?a=b HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(head(upstream.value())[0], b"GET /?a=b HTTP/1.1")

    def test_unproxyable_target_is_a_400(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        self.assertEqual(proxy.reactor.tcpClients, [])
        response = proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response)
        self.assertIn(b'"error": "ollana: cannot proxy the request-target', response)

    def test_options_star_is_answered_here(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(proxy.reactor.tcpClients, [])
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))


class ResponseRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = ProxyHarness(self)
        self.proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.upstream = self.proxy.connect()

    def test_headers_status_and_body(self) -> None:
        self.proxy.answer(
            b"HTTP/1.1 418 I'm a teapot\r\nContent-Type: application/json\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n{}"
        )
        response = self.proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 418 I'm a teapot")
        self.assertEqual(header_values(response, b"content-type"), [b"application/json"])
        self.assertEqual(header_values(response, b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(header_values(response, b"content-length"), [b"2"])
        self.assertEqual(header_values(response, b"keep-alive"), [])
        self.assertEqual(header_values(response, b"via"), [b"1.1 ollana"])
        self.assertEqual(header_values(response, b"x-ollana-peer"), [b"198.18.0.2:11435"])
        self.assertTrue(response.endswith(b"\r\n\r\n{}"))

    def test_one_access_line_without_content(self) -> None:
        logged = capture_logs(self)
        self.proxy.reactor.advance(2)
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nsecret words")
        [line] = [e for e in logged if e.get("log_namespace") == "ollana.access"]
        self.assertEqual(
            {k: line[k] for k in ("client", "method", "path", "status", "peer", "duration_ms",
                                  "bytes_in", "bytes_out")},
            {"client": "198.18.0.50", "method": "GET", "path": "/api/tags", "status": 200,
             "peer": "198.18.0.2:11435", "duration_ms": 2000.0, "bytes_in": 0, "bytes_out": 12},
        )  # fmt: skip
        self.assertNotIn("secret", repr(line))

    def test_no_content_type_is_added(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(header_values(self.proxy.response(), b"content-type"), [])

    def test_chunks_are_relayed_as_they_arrive(self) -> None:
        self.proxy.answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.proxy.answer(b'6\r\n{"a"}\n\r\n')
        self.assertTrue(self.proxy.response().endswith(b'6\r\n{"a"}\n\r\n'))
        self.proxy.client.clear()
        self.proxy.answer(b'6\r\n{"b"}\n\r\n')
        self.assertEqual(self.proxy.response(), b'6\r\n{"b"}\n\r\n')
        self.proxy.answer(b"0\r\n\r\n")
        self.assertEqual(self.proxy.response(), b'6\r\n{"b"}\n\r\n0\r\n\r\n')
        self.assertFalse(self.proxy.client.disconnecting, "keep-alive")

    def test_slow_client_pauses_the_upstream(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.upstream.producerState, "producing")
        producer(self.proxy.client).pauseProducing()  # the client's send buffer is full
        self.assertEqual(self.upstream.producerState, "paused")
        producer(self.proxy.client).resumeProducing()
        self.assertEqual(self.upstream.producerState, "producing")

    def test_idle_timeout_after_pauses_and_many_chunks(self) -> None:
        """The timeout counts from the upstream's last chunk, not from each pause, and a
        long stream does not pile up timers."""
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        timers = len(self.proxy.reactor.getDelayedCalls())
        for _ in range(100):
            self.proxy.answer(b"1\r\nx\r\n")
            self.proxy.reactor.advance(5)
        self.assertLessEqual(len(self.proxy.reactor.getDelayedCalls()), timers)
        producer(self.proxy.client).pauseProducing()  # the client's wait, not the upstream's
        self.proxy.reactor.advance(1000)
        self.assertFalse(self.proxy.client.disconnecting)
        producer(self.proxy.client).resumeProducing()  # the upstream owes from now on
        self.proxy.reactor.advance(119)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.proxy.client.disconnecting)

    def test_upstream_dying_mid_stream_aborts_the_client(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.proxy.lose()
        self.assertTrue(self.proxy.client.disconnecting)
        self.assertTrue(self.proxy.response().endswith(b"3\r\nabc\r\n"), "no clean end")

    def test_idle_upstream_mid_stream_is_dropped(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.proxy.reactor.advance(119)
        self.proxy.answer(b"3\r\ndef\r\n")
        self.proxy.reactor.advance(119)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.proxy.client.disconnecting)
        self.assertTrue(self.upstream.disconnected, "the upstream connection is aborted")

    def test_a_slow_reader_is_not_an_idle_upstream(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        producer(self.proxy.client).pauseProducing()  # the client stops reading for long
        self.proxy.reactor.advance(3600)
        self.assertFalse(self.proxy.client.disconnecting)
        producer(self.proxy.client).resumeProducing()
        self.proxy.reactor.advance(119)  # the upstream's turn again: the timeout counts
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.proxy.client.disconnecting)

    def test_chunks_of_one_read_after_a_pause_are_the_clients_wait(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        client = self.proxy.client
        write = client.writeSequence

        def fill_up(data: Sequence[bytes]) -> None:  # the client's buffer fills at the first chunk
            write(data)
            if b"abc" in b"".join(data) and client.producerState == "producing":
                producer(client).pauseProducing()

        client.writeSequence = fill_up  # type: ignore[method-assign]
        self.proxy.answer(b"3\r\nabc\r\n3\r\ndef\r\n")  # two chunks in one read
        self.proxy.reactor.advance(3600)
        self.assertFalse(client.disconnecting)
        self.assertTrue(client.value().endswith(b"3\r\ndef\r\n"))

    def test_no_server_header_of_our_own(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(header_values(self.proxy.response(), b"server"), [])

    def test_no_length_is_made_up_for_204(self) -> None:
        self.proxy.answer(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        response = self.proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 204 No Content\r\n"), response)
        self.assertEqual(header_values(response, b"content-length"), [])
        self.assertEqual(header_values(response, b"transfer-encoding"), [])
        self.assertEqual(header_values(response, b"x-a"), [b"1"])
        self.assertTrue(response.endswith(b"\r\n\r\n"))

    def test_304_has_no_body(self) -> None:
        # twisted.web.client keeps a 304's Content-Length to itself; it is optional there.
        self.proxy.answer(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: x\r\n\r\n")
        response = self.proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 304 Not Modified\r\n"), response)
        self.assertEqual(header_values(response, b"content-length"), [])
        self.assertEqual(header_values(response, b"transfer-encoding"), [])
        self.assertEqual(header_values(response, b"etag"), [b"x"])
        self.assertTrue(response.endswith(b"\r\n\r\n"))
        self.assertFalse(self.proxy.client.disconnecting, "the next request may come")

    def test_client_leaving_mid_stream_closes_the_upstream(self) -> None:
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.upstream.disconnected, "the upstream connection is aborted")
        before = self.proxy.response()
        self.proxy.answer(b"3\r\ndef\r\n")
        self.assertEqual(self.proxy.response(), before, "nothing written after the client left")


class UploadTests(SynchronousTestCase):
    def test_body_streams_before_it_is_complete(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(header_values(upstream.value(), b"content-length"), [b"10"])
        proxy.send(b"01234")
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n01234"))
        self.assertEqual(proxy.response(), b"", "no answer before the upstream's")
        proxy.send(b"56789")
        self.assertTrue(upstream.value().endswith(b"0123456789"))
        proxy.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 201 Created"))

    def test_chunked_upload_goes_up_chunked(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(header_values(upstream.value(), b"transfer-encoding"), [b"chunked"])
        proxy.send(b"3\r\nabc\r\n")
        self.assertTrue(upstream.value().endswith(b"3\r\nabc\r\n"))
        proxy.send(b"0\r\n\r\n")
        self.assertTrue(upstream.value().endswith(b"0\r\n\r\n"))

    def test_slow_upstream_pauses_the_client(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
        upstream = proxy.connect()
        proxy.send(b"aaa")
        self.assertEqual(proxy.client.producerState, "producing")
        producer(upstream).pauseProducing()  # the upstream's send buffer is full
        proxy.send(b"bbb")
        self.assertEqual(proxy.client.producerState, "paused")
        self.assertFalse(upstream.value().endswith(b"bbb"))
        producer(upstream).resumeProducing()
        self.assertEqual(proxy.client.producerState, "producing")
        self.assertTrue(upstream.value().endswith(b"aaabbb"))
        proxy.send(b"ccc")
        self.assertTrue(upstream.value().endswith(b"aaabbbccc"))

    def test_body_waits_for_the_connection_with_the_client_paused(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        self.assertEqual(proxy.client.producerState, "paused")
        upstream = proxy.connect()
        self.assertTrue(upstream.value().endswith(b"\r\n\r\nabc"))
        self.assertEqual(proxy.client.producerState, "producing")

    def test_expect_100_continue(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(
            b"PUT /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(proxy.response(), b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(header_values(upstream.value(), b"expect"), [])
        proxy.send(b"xyz")
        self.assertTrue(upstream.value().endswith(b"xyz"))

    def test_upload_to_an_unreachable_upstream_is_dropped_not_held(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        self.assertEqual(proxy.client.producerState, "paused")
        proxy.refuse()
        self.assertEqual(proxy.client.producerState, "producing")
        proxy.send(b"def")
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 502 Bad Gateway"))


class UploadTimeoutTests(SynchronousTestCase):
    """Who is waiting on whom during an upload decides which timeout counts."""

    def setUp(self) -> None:
        self.proxy = ProxyHarness(self)
        self.proxy.send(
            b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
        )
        self.upstream = self.proxy.connect()

    def test_a_slow_uploader_is_not_an_idle_upstream(self) -> None:
        proxy = ProxyHarness(self)
        chunk = b"ab" * 25 * MIN_BODY_RATE  # 50 s worth at the slowest rate allowed
        proxy.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: %d\r\n\r\n" % (15 * len(chunk)))  # fmt: skip
        upstream = proxy.connect()
        for _ in range(15):  # 750 s in all, the client never quiet for a minute
            proxy.send(chunk)
            proxy.reactor.advance(50)
        self.assertEqual(proxy.response(), b"")
        self.assertTrue(upstream.value().endswith(chunk * 15))
        proxy.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 201 Created"))

    def test_a_quiet_uploader_times_out_like_any_client(self) -> None:
        self.proxy.send(b"ab")
        self.proxy.reactor.advance(60)
        self.assertTrue(self.proxy.client.disconnecting)

    def test_an_upload_held_by_the_upstream_is_not_timed_out_as_a_client(self) -> None:
        producer(self.upstream).pauseProducing()  # the upstream stops reading for a while
        self.proxy.send(b"a" * 10)
        self.assertEqual(self.proxy.client.producerState, "paused")
        self.proxy.reactor.advance(100)  # past the client's 60 s, within the upstream's 120
        self.assertFalse(self.proxy.client.disconnecting)
        producer(self.upstream).resumeProducing()
        self.assertEqual(self.proxy.client.producerState, "producing")
        self.proxy.send(b"b" * 20)
        self.proxy.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.proxy.response().startswith(b"HTTP/1.1 201 Created"))
        # The keep-alive connection has its own timeout back once the request is done.
        self.proxy.reactor.advance(59)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.proxy.client.disconnecting)

    def test_the_last_bytes_held_do_not_leave_the_timeout_off(self) -> None:
        producer(self.upstream).pauseProducing()
        self.proxy.send(b"c" * 30)  # the whole body, held here
        self.proxy.reactor.advance(100)
        producer(self.upstream).resumeProducing()
        self.assertTrue(self.upstream.value().endswith(b"c" * 30))
        self.proxy.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.proxy.response().startswith(b"HTTP/1.1 201 Created"))
        self.proxy.reactor.advance(60)
        self.assertTrue(self.proxy.client.disconnecting)

    def test_an_upstream_that_stops_reading_is_idle(self) -> None:
        producer(self.upstream).pauseProducing()
        self.proxy.send(b"a" * 10)
        self.proxy.reactor.advance(119)
        self.assertFalse(self.upstream.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.upstream.disconnecting)
        self.proxy.lose()
        self.assertEqual(self.proxy.client.producerState, "producing", "the rest is dropped")
        self.proxy.send(b"b" * 20)
        response = self.proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 504 Gateway Time-out")
        self.assertNotIn(b"b" * 20, self.upstream.value())

    def test_an_early_answer_drops_the_rest_of_the_body(self) -> None:
        producer(self.upstream).pauseProducing()  # the upstream reads no more...
        self.proxy.send(b"a" * 10)
        self.assertEqual(self.proxy.client.producerState, "paused")
        self.proxy.answer(  # ...and answers at once
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 2\r\n\r\nno"
        )
        self.assertEqual(self.proxy.client.producerState, "producing")
        self.proxy.send(b"b" * 20)
        response = self.proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 Request Entity Too Large"), response)
        self.assertTrue(response.endswith(b"\r\n\r\nno"))
        self.assertNotIn(b"b" * 20, self.upstream.value())
        # The upstream connection, which would wait for the rest of the body, is dropped;
        # once it is gone (a turn later, for a real transport) the request ends, and the
        # client's next request on its connection is served.
        self.assertTrue(self.upstream.disconnected, "aborted")
        self.proxy.lose()
        self.proxy.send(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.connect()

    def test_upstream_lost_mid_upload(self) -> None:
        logged = capture_logs(self)
        self.proxy.send(b"a" * 10)
        self.proxy.lose()
        self.proxy.send(b"b" * 20)  # the client goes on; its body has nowhere to go
        response = self.proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([e for e in logged if e.get("log_failure")], [])


class ErrorTests(SynchronousTestCase):
    def body(self, response: bytes) -> object:
        return json.loads(response.split(b"\r\n\r\n", 1)[1])

    def test_no_server_is_a_503_with_retry_after(self) -> None:
        proxy = ProxyHarness(self, upstream=None)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(header_values(response, b"retry-after"), [b"5"])
        self.assertEqual(
            header_values(response, b"content-type"), [b"application/json; charset=utf-8"]
        )
        self.assertEqual(
            self.body(response), {"error": "ollana: no Ollama server found on the LAN yet"}
        )

    def test_a_failing_chooser_is_logged_and_answered(self) -> None:
        proxy = ProxyHarness(self, upstream=ZeroDivisionError("bug"))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_refused_is_a_502_naming_the_upstream(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.refuse()
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(
            self.body(response),
            {"error": "ollana: no answer from http://127.0.0.1:11434: connection refused"},
        )

    def test_connect_timeout_is_a_504(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.refuse(reason=error.TimeoutError())
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 504 Gateway Time-out")
        self.assertEqual(
            self.body(response),
            {"error": "ollana: cannot connect to http://127.0.0.1:11434: timed out"},
        )

    def test_silent_upstream_is_a_504_after_the_first_byte_timeout(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        upstream = proxy.connect()
        proxy.reactor.advance(299)
        self.assertEqual(proxy.response(), b"")
        proxy.reactor.advance(1)
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 504 Gateway Time-out")
        self.assertEqual(header_values(response, b"x-ollana-error"), [b"timeout"])
        self.assertEqual(
            self.body(response), {"error": "ollana: http://127.0.0.1:11434 sent nothing for 300 s"}
        )
        self.assertTrue(upstream.disconnecting)

    def test_an_upstream_that_stops_reading_the_body_times_out_after_the_idle_timeout(
        self,
    ) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/blobs/sha256:1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        upstream = proxy.connect()
        producer(upstream).pauseProducing()  # the upstream reads no more of the body
        proxy.send(b"cd")  # held: the client is not read from meanwhile
        proxy.reactor.advance(119)
        self.assertEqual(proxy.response(), b"")
        proxy.reactor.advance(1)
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 504 Gateway Time-out")
        self.assertEqual(
            self.body(response), {"error": "ollana: http://127.0.0.1:11434 sent nothing for 120 s"}
        )

    def test_client_leaving_before_the_connection_cancels_it(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(proxy.reactor.connectors[0].stoppedConnecting)

    def test_client_leaving_before_the_response_closes_the_upstream(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        upstream = proxy.connect()
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(upstream.disconnecting)
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(proxy.response(), b"")


class ConnectionReuseTests(SynchronousTestCase):
    def test_every_method_and_one_kept_alive_upstream_connection(self) -> None:
        proxy = ProxyHarness(self)
        methods = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
        for n, method in enumerate(methods):
            proxy.send(method + b" /api/x?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            if n == 0:
                upstream = proxy.connect()
            self.assertEqual(len(proxy.reactor.tcpClients), 1, "the connection is reused")
            self.assertTrue(
                upstream.value().startswith(method + b" /api/x?n=%d HTTP/1.1\r\n" % n),
                upstream.value(),
            )
            upstream.clear()
            proxy.client.clear()
            proxy.answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
                + (b"" if method == b"HEAD" else b"ok")
            )
            response = proxy.response()
            self.assertTrue(response.startswith(b"HTTP/1.1 200 OK"), (method, response))
            self.assertEqual(response.endswith(b"\r\n\r\nok"), method != b"HEAD")
            self.assertEqual(header_values(response, b"content-length"), [b"2"])
        self.assertFalse(proxy.client.disconnecting)

    def test_client_asking_to_close(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(header_values(upstream.value(), b"connection"), [], "a hop-by-hop header")
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response = proxy.response()
        self.assertEqual(header_values(response, b"connection"), [b"close"])
        self.assertTrue(proxy.client.disconnecting)
        self.assertFalse(upstream.disconnecting, "the upstream connection is kept for others")


A = Upstream("http://127.0.0.1:1001", peer="198.18.0.2:11435")
B = Upstream("http://127.0.0.1:1002", peer="198.18.0.3:11435")
C = Upstream("http://127.0.0.1:1003", peer="198.18.0.4:11435")


class Recording(Router):
    """Candidates in a fixed order; records what the proxy tells its router."""

    def __init__(self, *upstreams: Upstream, scan_limit: int = 1024, model_aware: bool = False):
        super().__init__()
        self.upstreams = list(upstreams)
        self.scan_limit = scan_limit
        self.model_aware = model_aware
        self.asked: list[str | None] = []
        self.events: list[tuple[str, str | None]] = []
        self.good: list[str | None] = []
        self.listing_model = False  # what lists() says of every upstream

    def wants_model(self, method: bytes, path: bytes) -> bool:
        return self.model_aware

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        self.asked.append(model)
        return [replace(upstream, model=model, key=key) for upstream in self.upstreams]

    def lists(self, upstream: Upstream, model: str) -> bool:
        return self.listing_model

    def started(self, upstream: Upstream, watcher: Watcher) -> None:
        super().started(upstream, watcher)
        self.events.append(("started", upstream.peer))

    def ended(self, upstream: Upstream, watcher: Watcher) -> None:
        super().ended(upstream, watcher)
        self.events.append(("ended", upstream.peer))

    def failed(self, upstream: Upstream, reason: str) -> None:
        self.events.append(("failed " + reason, upstream.peer))

    def errored(self, upstream: Upstream, reason: str) -> None:
        self.events.append(("errored " + reason, upstream.peer))

    def succeeded(self, upstream: Upstream) -> None:
        self.good.append(upstream.peer)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
COUNTS = ("failed", "errored")  # what the proxy holds against an upstream


def stall_checks(proxy: ProxyHarness) -> list[DelayedCall]:
    """The timers that would cut a stream whose upstream was found down."""
    calls = proxy.reactor.getDelayedCalls()
    return [
        c
        for c in calls
        if isinstance(c, DelayedCall) and getattr(c.func, "__name__", "") == "_cut_if_silent"
    ]


class RetryTests(SynchronousTestCase):
    def test_the_routers_of_these_tests_are_routers(self) -> None:
        for router in (Recording(A, B), Scripted(A), Scripted(None)):
            self.assertTrue(verifyObject(IRouter, router))

    def test_refused_goes_to_the_next_server_with_the_whole_body(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabcdef")
        proxy.refuse(1001)
        upstream = proxy.connect(port=1002)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\nabcdef"))
        proxy.answer(OK)
        response = proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK"), response)
        self.assertEqual(header_values(response, b"x-ollana-peer"), [b"198.18.0.3:11435"])
        self.assertEqual(
            router.events,
            [("started", A.peer), ("ended", A.peer), ("failed connection refused", A.peer),
             ("started", B.peer), ("ended", B.peer)],
        )  # fmt: skip

    def test_a_body_still_arriving_follows_to_the_next_server(self) -> None:
        proxy = ProxyHarness(self, Recording(A, B))
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        first = proxy.connect(port=1001)
        self.assertTrue(first.value().endswith(b"abc"))
        proxy.lose()  # reset before any answer
        second = proxy.connect(port=1002)
        self.assertTrue(second.value().endswith(b"\r\n\r\nabc"))
        proxy.send(b"def")
        self.assertTrue(second.value().endswith(b"\r\n\r\nabcdef"))
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))

    def test_no_retry_once_the_response_has_started(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        proxy.lose()
        self.assertEqual(len(proxy.reactor.tcpClients), 1, "no second attempt")
        self.assertTrue(proxy.client.disconnecting)
        self.assertEqual(router.events, [("started", A.peer), ("ended", A.peer)])

    def test_no_retry_when_the_body_outgrew_the_replay_buffer(self) -> None:
        proxy = ProxyHarness(self, Recording(A, B, scan_limit=4))
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        proxy.connect(port=1001)
        proxy.send(b"de")  # 5 bytes sent: more than can be replayed
        proxy.lose()
        proxy.send(b"f")
        self.assertEqual(len(proxy.reactor.tcpClients), 1, "no second attempt")
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(b"no answer from http://127.0.0.1:1001", response)

    def test_attempts_are_bounded_and_all_reasons_reported(self) -> None:
        proxy = ProxyHarness(self, Recording(A, B, C))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.refuse(1001)
        proxy.refuse(1002, error.TimeoutError())
        proxy.refuse(1003)
        self.assertEqual(len(proxy.reactor.tcpClients), 3)
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(
            json.loads(response.split(b"\r\n\r\n", 1)[1]),
            {"error": "ollana: no server could answer: "
                      "http://127.0.0.1:1001: connection refused; "
                      "http://127.0.0.1:1002: cannot connect: timed out; "
                      "http://127.0.0.1:1003: connection refused"},
        )  # fmt: skip

    def test_a_servers_own_error_is_tried_on_the_next_server(self) -> None:
        for kind, counted in [
            (b"unreachable", [("failed HTTP 502 (unreachable)", A.peer)]),
            (b"timeout", [("errored HTTP 504 (timeout)", A.peer)]),
            (b"busy", []),
        ]:
            router = Recording(A, B)
            proxy = ProxyHarness(self, router)
            proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabcdef")
            first = proxy.connect(port=1001)
            code = {b"unreachable": b"502", b"timeout": b"504", b"busy": b"503"}[kind]
            proxy.answer(b"HTTP/1.1 " + code + b" Oops\r\nX-Ollana-Error: " + kind
                         + b"\r\nContent-Length: 2\r\n\r\n{}")  # fmt: skip
            self.assertTrue(first.disconnecting, kind)
            second = proxy.connect(port=1002)
            self.assertTrue(second.value().endswith(b"\r\n\r\nabcdef"), kind)
            proxy.answer(OK)
            self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"), kind)
            self.assertEqual(
                [e for e in router.events if e[0].split()[0] in COUNTS],
                counted,
                kind,  # failed, errored
            )
            self.assertEqual(router.good, [B.peer], kind)

    def test_a_servers_own_error_is_relayed_when_no_server_is_left(self) -> None:
        proxy = ProxyHarness(self, Recording(A))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 503 Service Unavailable\r\nX-Ollana-Error: busy\r\n"
                     b"Retry-After: 1\r\nContent-Length: 2\r\n\r\n{}")  # fmt: skip
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(header_values(response, b"retry-after"), [b"1"])

    def test_ollamas_own_errors_are_relayed_and_server_errors_counted(self) -> None:
        for code, counted in [(b"500", [("errored HTTP 500", A.peer)]), (b"404", []),
                              (b"400", [])]:  # fmt: skip
            router = Recording(A, B)
            proxy = ProxyHarness(self, router)
            proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
            proxy.connect(port=1001)
            proxy.answer(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 2\r\n\r\n{}")
            self.assertTrue(proxy.response().startswith(b"HTTP/1.1 " + code), code)
            self.assertEqual(len(proxy.reactor.tcpClients), 1, code)
            self.assertEqual([e for e in router.events if e[0].split()[0] in COUNTS], counted, code)
            self.assertEqual(router.good, [] if counted else [A.peer], code)

    def test_ollamas_busy_answer_counts_and_goes_elsewhere(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
        proxy.connect(port=1002)
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(
            [e for e in router.events if e[0].split()[0] in COUNTS], [("errored HTTP 503", A.peer)]
        )

    def test_model_not_found_goes_to_a_server_that_lists_it(self) -> None:
        for listed, retried in [(True, True), (False, False)]:
            router = Recording(A, B, model_aware=True)
            router.listing_model = listed
            proxy = ProxyHarness(self, router)
            proxy.send(b'POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n'
                       b'{"model": "qwen"}')  # fmt: skip
            proxy.connect(port=1001)
            proxy.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
            self.assertEqual(len(proxy.reactor.tcpClients), 2 if retried else 1, listed)
            self.assertEqual([e for e in router.events if e[0].split()[0] in COUNTS], [])

    def test_a_request_waiting_on_a_server_found_down_goes_elsewhere_at_once(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        first = proxy.connect(port=1001)
        proxy.reactor.advance(10)
        router.found_down(A.url, "no answer within 3 s")
        self.assertTrue(first.disconnecting)
        second = proxy.connect(port=1002)
        self.assertTrue(second.value().endswith(b"\r\n\r\n{}"))
        router.found_down(A.url, "again")  # the first attempt is no longer watching
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(
            [e for e in router.events if e[0].split()[0] in COUNTS], [], "the router knew"
        )

    def test_found_down_with_no_server_left_is_a_502_of_ours(self) -> None:
        router = Recording(A)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        router.found_down(A.url, "no answer within 3 s")
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(header_values(response, b"x-ollana-error"), [b"unreachable"])
        self.assertEqual(
            json.loads(response.split(b"\r\n\r\n", 1)[1]),
            {"error": "ollana: http://127.0.0.1:1001 was found down: no answer within 3 s"},
        )

    def test_a_stream_stalled_on_a_server_found_down_is_cut(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream = proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        proxy.reactor.advance(4)
        router.found_down(A.url, "no answer within 3 s")
        self.assertFalse(proxy.client.disconnecting, "it spoke 4 s ago: may still be working")
        proxy.reactor.advance(1)  # once, and silent for 5 s since its last chunk: hung
        self.assertTrue(proxy.client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(len(proxy.reactor.tcpClients), 1, "a stream under way is not retried")

    def test_a_stream_that_goes_on_on_a_server_found_down_is_left_alone(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        router.found_down(A.url, "no answer within 3 s")
        router.found_down(A.url, "no answer within 3 s")
        self.assertEqual(len(stall_checks(proxy)), 1, "one check, however often it is told")
        proxy.reactor.advance(4)
        proxy.answer(b"3\r\ndef\r\n")  # it goes on: not hung
        proxy.reactor.advance(4)
        self.assertFalse(proxy.client.disconnecting)
        router.found_down(A.url, "no answer within 3 s")
        proxy.answer(b"0\r\n\r\n")
        self.assertTrue(proxy.response().endswith(b"3\r\ndef\r\n0\r\n\r\n"))
        self.assertFalse(proxy.client.disconnecting)
        self.assertEqual(stall_checks(proxy), [], "none left once the stream ended")

    def test_a_silent_server_is_replaced_after_the_first_byte_timeout(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        first = proxy.connect(port=1001)
        proxy.reactor.advance(299)
        self.assertFalse(first.disconnecting)
        proxy.reactor.advance(1)
        self.assertTrue(first.disconnecting)
        proxy.lose()
        proxy.connect(port=1002)
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))
        # Slow is not broken: the checks, not this request, say whether A is down; but
        # it counts towards ejection.
        self.assertEqual(
            [e for e in router.events if e[0].split()[0] in COUNTS],
            [("errored sent nothing for 300 s", A.peer)],
        )

    def test_a_client_leaving_does_not_count_against_the_server(self) -> None:
        router = Recording(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(router.events, [("started", A.peer), ("ended", A.peer)])
        self.assertEqual(len(proxy.reactor.tcpClients), 1)


class ModelRoutingTests(SynchronousTestCase):
    def test_the_server_is_chosen_once_the_model_is_known(self) -> None:
        router = Recording(A, model_aware=True)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n")
        proxy.send(b'{"prompt": "hi", "mod')
        self.assertEqual(proxy.reactor.tcpClients, [], "not before the model is known")
        self.assertEqual(proxy.client.producerState, "producing")
        proxy.send(b'el": "llava", "x": 1}')
        self.assertEqual(router.asked, ["llava"])
        upstream = proxy.connect(port=1001)
        self.assertTrue(
            upstream.value().endswith(b'\r\n\r\n{"prompt": "hi", "model": "llava", "x": 1}')
        )

    def test_no_model_is_decided_at_the_end_of_the_body(self) -> None:
        router = Recording(A, model_aware=True)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(router.asked, [None])
        self.assertTrue(proxy.connect(port=1001).value().endswith(b"\r\n\r\n{}"))

    def test_a_body_past_the_scan_limit_goes_to_the_normal_choice(self) -> None:
        router = Recording(A, model_aware=True, scan_limit=8)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n")
        proxy.send(b'{"images": ["AAAAAAAA')
        self.assertEqual(router.asked, [None])
        upstream = proxy.connect(port=1001)
        proxy.send(b'"], "model": "x"}')
        self.assertTrue(upstream.value().endswith(b'{"images": ["AAAAAAAA"], "model": "x"}'))


class LocalAnswerTests(SynchronousTestCase):
    def test_a_listing_is_answered_here(self) -> None:
        answer = LocalAnswer(200, [(b"content-type", b"application/json")], b'{"models": []}')

        class ListingRouter(Recording):
            def listing(self, method: bytes, path: bytes) -> Listing | None:
                return (lambda: defer.succeed(answer)) if path == b"/api/tags" else None

        proxy = ProxyHarness(self, ListingRouter(A))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(proxy.reactor.tcpClients, [])
        response = proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(header_values(response, b"content-length"), [b"14"])
        self.assertTrue(response.endswith(b'\r\n\r\n{"models": []}'))

    def test_a_listing_that_fails_is_a_502(self) -> None:
        class ListingRouter(Recording):
            def listing(self, method: bytes, path: bytes) -> Listing | None:
                return lambda: defer.fail(UpstreamsFailed("ollana: no server could answer: x"))

        proxy = ProxyHarness(self, ListingRouter(A))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        response = proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(b"no server could answer: x", response)


class ReviewRegressionTests(SynchronousTestCase):
    def test_a_body_with_nowhere_to_go_is_not_kept(self) -> None:
        proxy = ProxyHarness(self, upstream=None)  # no server: a 503 once the body is in
        size = 3 << 20
        proxy.send(b"POST /api/blobs/sha256:a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                   % size)  # fmt: skip
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        for _ in range(size // 65536):
            proxy.send(bytes(65536))  # a new buffer each time, as reads are
        kept, _ = tracemalloc.get_traced_memory()
        self.assertLess(kept, 1 << 20)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 503 "))

    def test_a_scan_limit_of_zero_turns_scanning_and_replay_off(self) -> None:
        router = Recording(A, B, model_aware=True, scan_limit=0)
        proxy = ProxyHarness(self, router)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabcdef")
        self.assertEqual(router.asked, [None])
        proxy.refuse(1001)
        self.assertEqual(len(proxy.reactor.tcpClients), 1, "no replay: no second attempt")
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 502 "))


CHAT = json.dumps({
    "model": "llama3.2",
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "What is Twisted?"}],
}).encode("ascii")  # fmt: skip
CHAT_KEY = conversation_key(b"/api/chat", "llama3.2", CHAT)


def post(path: bytes, length: int) -> bytes:
    """The head of a POST with a body of length bytes."""
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, length)


class Keyed(Recording):
    """Recording, waiting for the affinity key of conversation turns as client mode does; it
    records the keys it is asked with, and adds its own headers to relayed answers."""

    def __init__(self, *upstreams: Upstream, scan_limit: int = 1024) -> None:
        super().__init__(*upstreams, scan_limit=scan_limit, model_aware=True)
        self.keys: list[str | None] = []
        self.added: list[tuple[bytes, bytes]] = []

    def wants_key(self, method: bytes, path: bytes) -> bool:
        return method == b"POST" and wants_key(path)

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        self.keys.append(key)
        return super().candidates(model, key)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return self.added


class AffinityKeyTests(SynchronousTestCase):
    def test_a_turn_is_routed_once_its_whole_body_is_in(self) -> None:
        self.assertIsNotNone(CHAT_KEY)
        router = Keyed(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(post(b"/api/chat", len(CHAT)) + CHAT[:40])
        self.assertIn(b'"model": "llama3.2"', CHAT[:40])
        self.assertEqual((router.asked, proxy.reactor.tcpClients), ([], []), "not yet")
        self.assertEqual(proxy.client.producerState, "producing", "the rest is read")
        proxy.send(CHAT[40:])
        self.assertEqual((router.asked, router.keys), (["llama3.2"], [CHAT_KEY]))
        upstream = proxy.connect(port=1001)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + CHAT))
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(router.good, [A.peer])

    def test_a_turn_is_retried_elsewhere_with_its_whole_body(self) -> None:
        router = Keyed(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(post(b"/v1/chat/completions?x=1", len(CHAT)) + CHAT[:30])
        proxy.send(CHAT[30:])
        self.assertEqual(router.keys, [conversation_key(b"/v1/chat/completions", "llama3.2",
                                                        CHAT)])  # fmt: skip
        proxy.refuse(1001)
        upstream = proxy.connect(port=1002)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + CHAT))

    def test_a_body_past_the_key_limit_is_routed_without_a_key_at_once(self) -> None:
        router = Keyed(A)
        proxy = ProxyHarness(self, router)
        start = b'{"model": "llama3.2", "messages": [{"role": "user", "content": "'
        end = b'"}]}'
        text = b"q" * (KEY_LIMIT + 1000 - len(start) - len(end))
        proxy.send(post(b"/api/chat", len(start + text + end)) + start)
        proxy.send(text[: KEY_LIMIT - len(start)])
        self.assertEqual(router.asked, [], "up to the limit, the key may still come")
        proxy.send(text[KEY_LIMIT - len(start) : KEY_LIMIT - len(start) + 1])
        self.assertEqual((router.asked, router.keys), (["llama3.2"], [None]))
        upstream = proxy.connect(port=1001)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + (start + text)[: KEY_LIMIT + 1]))
        proxy.send(text[KEY_LIMIT - len(start) + 1 :] + end)
        self.assertTrue(upstream.value().endswith(b"\r\n\r\n" + start + text + end))
        proxy.answer(OK)
        self.assertTrue(proxy.response().startswith(b"HTTP/1.1 200 OK"))

    def test_a_body_nested_too_deep_to_parse_is_routed_without_a_key(self) -> None:
        router = Keyed(A)
        proxy = ProxyHarness(self, router)
        body = b'{"model": "llama3.2", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        proxy.send(post(b"/api/chat", len(body)) + body[:100])
        proxy.send(body[100:])
        self.assertEqual((router.asked, router.keys), (["llama3.2"], [None]))
        self.assertTrue(proxy.connect(port=1001).value().endswith(body))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_other_requests_do_not_wait_for_the_body(self) -> None:
        router = Keyed(A)
        proxy = ProxyHarness(self, router)
        body = b'{"model": "llama3.2", "input": "What is Twisted?"}'
        proxy.send(post(b"/api/embed", len(body)) + body[:30])
        self.assertEqual((router.asked, router.keys), (["llama3.2"], [None]))
        proxy.connect(port=1001)
        proxy.send(body[30:])
        proxy.answer(OK)
        proxy.client.clear()
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((router.asked, router.keys), (["llama3.2", None], [None, None]))

    def test_the_client_leaving_while_the_body_comes_leaves_nothing_behind(self) -> None:
        logged = capture_logs(self)
        router = Keyed(A, B)
        proxy = ProxyHarness(self, router)
        proxy.send(post(b"/api/chat", len(CHAT)) + CHAT[:40])
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((router.asked, router.events), ([], []))
        self.assertEqual(proxy.reactor.tcpClients, [])
        self.assertEqual(proxy.reactor.getDelayedCalls(), [])
        gc.collect()  # an unhandled failure would be logged as its Deferred goes
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([e for e in logged if e.get("log_failure")], [])


class RouteHeaderTests(SynchronousTestCase):
    def test_the_reason_a_server_was_chosen(self) -> None:
        proxy = ProxyHarness(self, Recording(replace(A, route="affinity")))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 200 OK\r\nX-Ollana-Route: bogus\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(header_values(proxy.response(), b"x-ollana-route"), [b"affinity"])

    def test_the_reason_of_the_server_that_answered(self) -> None:
        router = Recording(replace(A, route="warm"), replace(B, route="cold"))
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.refuse(1001)
        proxy.connect(port=1002)
        proxy.answer(OK)
        self.assertEqual(header_values(proxy.response(), b"x-ollana-route"), [b"cold"])

    def test_no_reason_no_header(self) -> None:
        proxy = ProxyHarness(self, Recording(A))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(OK)
        self.assertEqual(header_values(proxy.response(), b"x-ollana-route"), [])

    def test_the_routers_headers_are_on_every_relayed_answer(self) -> None:
        router = Keyed(A)
        router.added = [(b"x-ollana-state", b'{"n":1}')]
        proxy = ProxyHarness(self, router)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.connect(port=1001)
        proxy.answer(b"HTTP/1.1 200 OK\r\nX-Ollana-State: theirs\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(header_values(proxy.response(), b"x-ollana-state"), [b'{"n":1}'])
        router.added = [(b"x-ollana-state", b'{"n":2}')]  # the state has changed since
        proxy.client.clear()
        proxy.send(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        response = proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.1 404 Not Found"), response)
        self.assertEqual(header_values(response, b"x-ollana-state"), [b'{"n":2}'])


class LateModelTests(SynchronousTestCase):
    def test_a_model_found_past_the_key_limit_is_routed_at_once(self) -> None:
        router = Keyed(A, scan_limit=4 * KEY_LIMIT)
        proxy = ProxyHarness(self, router)
        start = b'{"messages": [{"role": "user", "content": "'
        text = b"q" * KEY_LIMIT
        rest = b'"}], "model": "llama3.2", "stream": true}'
        proxy.send(post(b"/api/chat", len(start + text + rest)) + start + text)
        self.assertEqual(router.asked, [], "no model yet")
        proxy.send(rest[:-5])  # the model, and more body to come
        self.assertEqual((router.asked, router.keys), (["llama3.2"], [None]))
