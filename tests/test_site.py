"""The listener's own answers: 503 busy past a connection cap, 408 for a request body that
stops coming, and log lines that a flood of either writes once a minute; the request line
as the channel hands it over, and a held client that leaves."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ollana.gate import Gate
from ollana.interfaces import IDownstream
from ollana.logs import Summary
from ollana.site import (
    BUSY_AT_ONCE,
    BUSY_READ,
    BUSY_WAIT,
    MIN_BODY_RATE,
    BusyAnswer,
    ProxyRequest,
)
from tests.support.fakes import capture_logs
from tests.support.http import ProxyHarness, head, header_values, producer

SOURCE = IPv4Address("TCP", "198.18.0.50", 40000)  # ProxyHarness's client
GET = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(proxy: ProxyHarness, addr: IPv4Address = SOURCE) -> tuple[Any, StringTransport]:
    """Another connection to the harness's site: the protocol it got, and its transport."""
    protocol = proxy.site.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    if protocol is not None:
        protocol.makeConnection(transport)
    return protocol, transport


def gone(protocol: Any) -> None:
    protocol.connectionLost(Failure(error.ConnectionDone()))


class BusyAnswerTests(SynchronousTestCase):
    """One connection per source is allowed here: the harness's own is the one."""

    def setUp(self) -> None:
        self.logged = capture_logs(self)
        self.proxy = ProxyHarness(self, gate=Gate(max_connections_per_source=1))
        self.busy, self.transport = connect(self.proxy)
        self.assertIsInstance(self.busy, BusyAnswer)

    def timers(self, kind: type) -> list[Any]:
        """The owners of the clock's pending timers that are of this kind."""
        calls = self.proxy.reactor.getDelayedCalls()
        owners = [getattr(getattr(call, "func", None), "__self__", None) for call in calls]
        return [owner for owner in owners if isinstance(owner, kind)]

    def refused(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("log_namespace") == "ollana.site"]

    def test_the_answer_waits_for_the_request_head(self) -> None:
        self.busy.dataReceived(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.busy.dataReceived(b"Content-Length: 2\r\n\r")
        self.assertEqual(self.transport.value(), b"")
        self.busy.dataReceived(b"\n{}")  # the head's end split between two reads
        response = self.transport.value()
        self.assertEqual(head(response)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(header_values(response, b"connection"), [b"close"])
        body = response.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(header_values(response, b"content-length"), [b"%d" % len(body)])
        self.assertIn("has 1 connections open, the most it may", json.loads(body)["error"])

    def test_it_reads_on_until_the_client_closes_or_time_is_up(self) -> None:
        self.busy.dataReceived(GET)
        self.assertFalse(self.transport.disconnecting, "the rest of a body may be on its way")
        self.busy.dataReceived(b"x" * 1000)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1"), 1)
        self.proxy.reactor.advance(BUSY_WAIT)
        self.assertTrue(self.transport.disconnecting)
        gone(self.busy)
        self.assertEqual(self.timers(BusyAnswer), [])

    def test_no_head_in_time_is_answered_and_closed(self) -> None:
        self.busy.dataReceived(b"GET /api/tags HT")
        self.proxy.reactor.advance(BUSY_WAIT - 0.1)
        self.assertEqual(self.transport.value(), b"")
        self.proxy.reactor.advance(0.1)
        self.assertEqual(head(self.transport.value())[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertTrue(self.transport.disconnecting)

    def test_what_it_reads_is_bounded(self) -> None:
        self.busy.dataReceived(b"x" * BUSY_READ)
        self.assertEqual(self.transport.value(), b"")
        self.busy.dataReceived(b"x")
        self.assertEqual(head(self.transport.value())[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertTrue(self.transport.disconnecting)

    def test_a_client_that_leaves_leaves_no_timer(self) -> None:
        self.assertEqual(self.proxy.site.turning_away, 1)
        gone(self.busy)
        self.assertEqual(self.proxy.site.turning_away, 0)
        self.assertEqual(self.timers(BusyAnswer), [])

    def test_past_the_ceiling_a_connection_is_closed_at_once(self) -> None:
        turned_away = [connect(self.proxy)[0] for _ in range(BUSY_AT_ONCE - 1)]
        self.assertTrue(all(isinstance(p, BusyAnswer) for p in turned_away))
        self.assertIsNone(self.proxy.site.buildProtocol(SOURCE))
        self.assertIsNone(self.proxy.site.buildProtocol(SOURCE))
        closed = [e for e in self.logged if "at once" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in closed], [BUSY_AT_ONCE])
        gone(turned_away[0])
        self.assertIsInstance(self.proxy.site.buildProtocol(SOURCE), BusyAnswer)

    def test_refusals_are_logged_once_a_minute(self) -> None:
        for _ in range(40):
            gone(connect(self.proxy)[0])
        [refused] = self.refused()
        self.assertEqual(refused["log_level"], LogLevel.warn)
        self.assertEqual((refused["client"], refused["limit"]), ("198.18.0.50", 1))
        self.proxy.reactor.advance(60)
        self.assertEqual([e.get("repeated") for e in self.refused()], [None, 40])

    def test_a_stopping_site_logs_what_it_counted(self) -> None:
        self.proxy.site.doStart()
        connect(self.proxy)
        connect(self.proxy)
        self.proxy.site.doStop()
        self.assertEqual([e.get("repeated") for e in self.refused()], [None, 2])
        self.assertEqual(self.timers(Summary), [])


class BodyTimeoutTests(SynchronousTestCase):
    """The channel's idle timeout (60 s) is the request body's too."""

    def setUp(self) -> None:
        self.proxy = ProxyHarness(self)
        self.proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        self.upstream = self.proxy.connect()

    def test_a_body_that_stops_is_408_and_its_upstream_request_dropped(self) -> None:
        logged = capture_logs(self)
        self.proxy.reactor.advance(59)
        self.assertEqual(self.proxy.response(), b"")
        self.proxy.reactor.advance(1)
        response = self.proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 408 Request Time-out")
        self.assertEqual(
            json.loads(response.split(b"\r\n\r\n", 1)[1]),
            {"error": "ollana: nothing more of the request came for 60 s"},
        )
        self.assertTrue(self.proxy.client.disconnecting)
        self.assertEqual([e["code"] for e in logged if "code" in e], [408])
        self.proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.upstream.disconnecting)

    def test_the_timeout_counts_from_the_last_byte(self) -> None:
        self.proxy.reactor.advance(59)
        self.proxy.send(b"a" * 4)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(59)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertEqual(head(self.proxy.response())[0], b"HTTP/1.1 408 Request Time-out")

    def test_a_trickled_body_is_408_and_its_upstream_request_dropped(self) -> None:
        self.proxy.reactor.advance(59)
        self.proxy.send(b"a")  # a byte a minute keeps the channel's timeout away
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(59)
        self.proxy.send(b"a")
        response = self.proxy.response()
        self.assertEqual(head(response)[0], b"HTTP/1.1 408 Request Time-out")
        self.assertEqual(
            json.loads(response.split(b"\r\n\r\n", 1)[1]),
            {"error": f"ollana: the request body came slower than {MIN_BODY_RATE} bytes/s"},
        )
        self.proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.upstream.disconnecting)

    def test_a_body_at_the_minimum_rate_passes(self) -> None:
        proxy = ProxyHarness(self)
        size = MIN_BODY_RATE * 130
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        upstream = proxy.connect()
        for _ in range(13):
            proxy.send(b"a" * MIN_BODY_RATE * 10)
            proxy.reactor.advance(10)
        self.assertEqual(proxy.response(), b"")
        self.assertTrue(upstream.value().endswith(b"a" * size))

    def test_time_held_does_not_count_against_the_rate(self) -> None:
        producer(self.upstream).pauseProducing()
        self.proxy.send(b"cd")  # held for 100 s: not the client's slowness
        self.proxy.reactor.advance(100)
        producer(self.upstream).resumeProducing()
        self.proxy.send(b"ef")
        self.assertEqual(self.proxy.response(), b"")

    def test_not_while_the_client_is_held(self) -> None:
        producer(self.upstream).pauseProducing()
        self.proxy.send(b"cd")  # held: not read from while the upstream takes no more
        self.proxy.reactor.advance(100)  # past the channel's 60 s, within the upstream's 120
        self.assertEqual(self.proxy.response(), b"")
        producer(self.upstream).resumeProducing()
        self.proxy.reactor.advance(59)
        self.assertEqual(self.proxy.response(), b"")
        self.proxy.reactor.advance(1)
        self.assertEqual(head(self.proxy.response())[0], b"HTTP/1.1 408 Request Time-out")

    def test_an_idle_kept_alive_connection_is_closed_without_an_answer(self) -> None:
        self.proxy.send(b"cdefghij")
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(self.proxy.response().startswith(b"HTTP/1.1 200 OK"))
        self.proxy.client.clear()
        self.proxy.reactor.advance(60)
        self.assertTrue(self.proxy.client.disconnecting)
        self.assertEqual(self.proxy.client.value(), b"")

    def test_a_partial_head_is_408_too(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=600))
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")
        proxy.reactor.advance(60)
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 408 Request Time-out")


class RequestLineTests(SynchronousTestCase):
    """The request line is read where the channel hands it over, for the gate and the
    exchange, which act on a request before twisted.web sets its method and URI."""

    def upstream_lines(self, data: bytes, count: int = 1) -> list[bytes]:
        """The request lines the upstream gets for data sent by the client."""
        proxy = ProxyHarness(self)
        proxy.send(data)
        lines = []
        for _ in range(count):
            if proxy.attempts > proxy.handled:
                proxy.connect()
            [(index, upstream)] = [(i, t) for i, t in enumerate(proxy.transports) if t.value()]
            lines.append(head(upstream.value())[0])
            upstream.clear()
            proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", index)
        return lines

    def test_the_method_and_target_go_upstream(self) -> None:
        sent = b"HEAD /api/tags?x=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: some client\r\n\r\n"
        self.assertEqual(self.upstream_lines(sent), [b"HEAD /api/tags?x=1 HTTP/1.1"])

    def test_one_blank_line_before_the_request_line_is_skipped(self) -> None:
        self.assertEqual(self.upstream_lines(b"\r\nGET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n"),
                         [b"GET /api/ps HTTP/1.1"])  # fmt: skip

    def test_two_blank_lines_are_a_malformed_request(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"\r\n\r\nGET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 400 Bad Request")
        self.assertEqual(proxy.reactor.tcpClients, [])

    def test_pipelined_requests_each_keep_their_own_line(self) -> None:
        self.assertEqual(
            self.upstream_lines(
                b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                b"\r\nGET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n",  # a blank line after a body
                count=3,
            ),
            [b"GET /api/tags HTTP/1.1", b"POST /api/show HTTP/1.1", b"GET /api/ps HTTP/1.1"],
        )

    def test_the_request_is_the_exchanges_downstream(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        [request] = proxy.channel.requests
        self.assertIsInstance(request, ProxyRequest)
        self.assertEqual(request.request_line, (b"POST", b"/api/chat", b"HTTP/1.1"))
        self.assertIs(request.exchange.request, request)
        self.assertTrue(verifyObject(IDownstream, request))


class HeldClientTests(SynchronousTestCase):
    """A client held while the upstream takes no more of its body, that then leaves."""

    def setUp(self) -> None:
        self.proxy = ProxyHarness(self)
        self.proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        self.upstream = self.proxy.connect()
        producer(self.upstream).pauseProducing()
        self.proxy.send(b"a" * 10)
        self.assertEqual(self.proxy.client.producerState, "paused")
        [self.request] = self.proxy.channel.requests

    def test_it_is_not_resumed_once_it_has_left(self) -> None:
        logged = capture_logs(self)
        gone(self.proxy.channel)
        self.request.release()
        self.request.hold()
        self.assertEqual(self.proxy.client.producerState, "paused")
        self.assertEqual([e for e in logged if e.get("log_failure")], [])

    def test_nothing_is_written_once_it_has_left(self) -> None:
        gone(self.proxy.channel)
        self.request.write(b"late")
        self.assertEqual(self.proxy.response(), b"")

    def test_an_abort_ends_its_connection_at_once(self) -> None:
        self.request.abort()
        self.assertTrue(self.proxy.client.disconnected)
        gone(self.proxy.channel)
        self.request.abort()  # gone: nothing left to abort


class SummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = EventLoggingObserver()
        self.summary = Summary(Logger(observer=self.events), self.clock, interval=60)

    def lines(self) -> list[tuple[str, Any]]:
        return [(e["client"], e.get("repeated")) for e in self.events]

    def test_the_first_is_logged_at_once(self) -> None:
        self.summary("Refused {client}", client="a")
        self.assertEqual(self.lines(), [("a", None)])
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)

    def test_repeats_are_one_line_with_their_count_at_the_end_of_the_interval(self) -> None:
        self.summary("Refused {client}", client="a")
        for client in "bcd":
            self.clock.advance(10)
            self.summary("Refused {client}", client=client)
        self.assertEqual(len(self.events), 1)
        self.clock.advance(30)
        self.assertEqual(self.lines(), [("a", None), ("d", 3)])
        self.assertEqual(
            self.events[1]["log_format"], "Refused {client} ({repeated} more in {interval:g} s)"
        )

    def test_a_flood_is_one_line_per_interval(self) -> None:
        for _ in range(600):
            self.summary("Refused {client}", client="a")
            self.clock.advance(1)
        self.assertEqual(self.lines(), [("a", None), ("a", 59)] + [("a", 60)] * 9)
        self.clock.advance(60)
        self.assertEqual(len(self.events), 11, "nothing when there was nothing")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.summary("Refused {client}", client="b")
        self.assertEqual(self.lines()[-1], ("b", None), "a new run is logged at once")

    def test_nothing_more_without_repeats(self) -> None:
        self.summary("Refused {client}", client="a")
        self.clock.advance(600)
        self.assertEqual(self.lines(), [("a", None)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_logs_the_count_and_leaves_no_timer(self) -> None:
        self.summary("Refused {client}", client="a")
        self.summary("Refused {client}", client="b")
        self.summary.stop()
        self.assertEqual(self.lines(), [("a", None), ("b", 1)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.summary.stop()
        self.assertEqual(len(self.events), 2)

    def test_its_level(self) -> None:
        summary = Summary(Logger(observer=self.events), self.clock, level=LogLevel.info)
        summary("Refused {client}", client="a")
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)


class RelayedAnswerHeadTests(SynchronousTestCase):
    """A relayed request skips twisted.web's resource lookup (ProxyRequest.process) but
    its answer's head is as twisted.web would start it."""

    def test_date_of_the_second_unless_the_upstream_sent_one(self) -> None:
        proxy = ProxyHarness(self)
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        proxy.reactor.advance(0.7)
        proxy.send(GET)
        proxy.connect()
        proxy.answer(ok)
        self.assertEqual(
            header_values(proxy.response(), b"date"), [b"Thu, 01 Jan 1970 00:00:00 GMT"]
        )
        proxy.client.clear()
        proxy.reactor.advance(0.5)  # the next second
        proxy.send(GET)
        proxy.answer(ok)
        self.assertEqual(
            header_values(proxy.response(), b"date"), [b"Thu, 01 Jan 1970 00:00:01 GMT"]
        )
        proxy.client.clear()
        proxy.send(GET)
        proxy.answer(b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
                     b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
        self.assertEqual(
            header_values(proxy.response(), b"date"), [b"Mon, 01 Jan 2024 00:00:00 GMT"]
        )

    def test_upstream_server_header_is_passed_and_twisted_webs_is_not(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(GET)
        proxy.connect()
        proxy.answer(b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(header_values(proxy.response(), b"server"), [b"nginx"])
        proxy.client.clear()
        proxy.send(GET)
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(header_values(proxy.response(), b"server"), [])
