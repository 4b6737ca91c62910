"""The server's gate: the source allow-list (403), the credential between nodes (401), the
limits (413, 408, connections per source: 503 busy), the Host rules (400, 403), and bad
input that must not stop the others."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from ollana.auth import request_credential
from ollana.gate import Gate, local_network_address, parse_network
from ollana.site import BusyAnswer, ProxyChannel
from tests.support.fakes import capture_logs
from tests.support.http import ProxyHarness, head, header_values

SECRET = b"correct horse battery staple"
LAN = IPv4Address("TCP", "192.168.1.20", 40000)
OUTSIDE = IPv4Address("TCP", "8.8.8.8", 40000)  # in memory only: no traffic
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
GET = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"


def server_gate(**kwargs: Any) -> Gate:
    return Gate(open_to_all=False, **kwargs)


def error_of(response: bytes) -> tuple[bytes, str]:
    line, _ = head(response)
    return line, json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


class AllowListTests(SynchronousTestCase):
    def test_default_is_the_local_networks(self) -> None:
        for host in ("127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.20", "169.254.1.1",
                     "::1", "fd00::1", "fe80::1%eth0", "::ffff:192.168.1.20"):  # fmt: skip
            self.assertTrue(local_network_address(host), host)
        for host in ("8.8.8.8", "1.1.1.1", "2001:4860::8888", "::ffff:8.8.8.8", "nonsense"):
            self.assertFalse(local_network_address(host), host)

    def test_outside_sources_are_not_even_served(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(), client=LAN)
        self.assertIsNone(proxy.site.buildProtocol(OUTSIDE), "closed at once, before a byte")

    def test_the_request_check_holds_too(self) -> None:
        refusal = server_gate().refusal("8.8.8.8", Headers())
        assert refusal is not None
        self.assertEqual(refusal[0], 403)
        self.assertIn("8.8.8.8 is not allowed", refusal[1])

    def test_odd_addresses_are_not_local(self) -> None:
        for host in ("0.0.0.0", "::", "240.0.0.1", "2001:0:53aa:64c:0:0:0:1"):
            self.assertFalse(local_network_address(host), host)

    def test_a_given_allow_list_replaces_the_default(self) -> None:
        gate = server_gate(allow=[parse_network("8.8.8.0/24")])
        self.assertTrue(gate.admits_source("8.8.8.8"))
        self.assertFalse(gate.admits_source("192.168.1.20"))
        proxy = ProxyHarness(self, gate=gate, client=OUTSIDE)
        proxy.send(GET)
        self.assertEqual(len(proxy.reactor.tcpClients), 1)
        self.assertIsNone(proxy.site.buildProtocol(LAN), "not in the given list")

    def test_a_local_source_passes(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(), client=LAN)
        proxy.send(GET)
        self.assertEqual(len(proxy.reactor.tcpClients), 1)

    def test_a_bad_cidr_is_a_usage_error(self) -> None:
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as raised:
            parse_network("10.0.0.0/33")
        self.assertEqual(
            str(raised.exception), "--allow: not an address or CIDR block: '10.0.0.0/33'"
        )


class CredentialTests(SynchronousTestCase):
    def test_no_credential_is_401(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(secret=SECRET), client=LAN)
        proxy.send(GET)
        self.assertEqual(proxy.reactor.tcpClients, [])
        line, message = error_of(proxy.response())
        self.assertEqual(line, b"HTTP/1.1 401 Unauthorized")
        self.assertNotIn(SECRET.decode(), proxy.response().decode())

    def test_a_wrong_credential_is_401(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(secret=SECRET), client=LAN)
        wrong = request_credential(b"another secret of enough length")
        proxy.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Ollana-Credential: " + wrong + b"\r\n\r\n")
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 401 Unauthorized")

    def test_the_credential_passes_and_is_not_passed_on(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(secret=SECRET), client=LAN)
        credential = request_credential(SECRET)
        proxy.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Ollana-Credential: " + credential + b"\r\n\r\n")
        upstream = proxy.connect()
        self.assertEqual(header_values(upstream.value(), b"x-ollana-credential"), [])
        self.assertNotIn(credential, upstream.value())

    def test_loopback_needs_none(self) -> None:
        proxy = ProxyHarness(self, gate=server_gate(secret=SECRET), client=LOOPBACK)
        proxy.send(GET)
        self.assertEqual(len(proxy.reactor.tcpClients), 1)

    def test_the_credential_is_not_the_secret(self) -> None:
        credential = request_credential(SECRET)
        self.assertNotIn(SECRET, credential)
        self.assertEqual(credential, request_credential(SECRET))
        self.assertEqual(len(credential), 64)


class LimitTests(SynchronousTestCase):
    def test_a_declared_body_over_the_limit_is_413_at_once(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(max_body=1000))
        proxy.send(b"POST /api/blobs/sha256:a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        self.assertEqual(proxy.reactor.tcpClients, [])
        line, message = error_of(proxy.response())
        self.assertEqual(line, b"HTTP/1.1 413 Request Entity Too Large")
        self.assertEqual(message, "ollana: request bodies are limited to 1000 bytes")
        self.assertTrue(proxy.client.disconnecting)
        proxy.send(b"x" * 5000)  # what was already on its way changes nothing
        self.assertEqual(proxy.response().count(b"HTTP/1.1"), 1)

    def test_a_chunked_body_over_the_limit_is_413_when_it_gets_there(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(max_body=10))
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        proxy.send(b"8\r\n12345678\r\n")
        self.assertEqual(proxy.response(), b"")
        proxy.send(b"8\r\n12345678\r\n")
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 413 Request Entity Too Large")
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(proxy.reactor.connectors[0].stoppedConnecting or proxy.transports == [])

    def test_no_limit_by_default(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(
            b"POST /api/blobs/sha256:a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
        )
        self.assertEqual(len(proxy.reactor.tcpClients), 1)

    def test_headers_that_trickle_in_are_cut_off(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(b"GET /api/tags HTTP/1.1\r\n")
        for _ in range(5):
            proxy.reactor.advance(5)
            proxy.send(b"X-Slow: 1\r\n")  # each byte in time for the channel's own timeout
        self.assertFalse(proxy.client.disconnecting)
        proxy.reactor.advance(5)
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 408 Request Time-out")
        self.assertTrue(proxy.client.disconnecting)

    def test_headers_in_time_stop_the_timer(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(GET)
        proxy.connect()
        proxy.reactor.advance(100)
        self.assertNotIn(b"408", proxy.response())

    def test_the_next_head_on_a_kept_alive_connection_is_timed_too(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(GET)
        proxy.connect()
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        proxy.client.clear()
        proxy.send(b"GET /api/ps HTTP/1.1\r\n")
        for _ in range(5):
            proxy.reactor.advance(5)
            proxy.send(b"X-Slow: 1\r\n")
        self.assertEqual(proxy.response(), b"")
        proxy.reactor.advance(5)
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 408 Request Time-out")

    def test_each_head_is_timed_from_its_own_first_byte_by_one_timer(self) -> None:
        """The connection's one header timer is pushed back for each head: many requests
        leave one timer, and the next head has its whole header_timeout."""
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(GET)
        proxy.connect()
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        timers = len(proxy.reactor.getDelayedCalls())
        for _ in range(50):
            proxy.send(GET)
            proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(len(proxy.reactor.getDelayedCalls()), timers)
        proxy.reactor.advance(20)
        proxy.client.clear()
        proxy.send(b"GET /api/ps HTTP/1.1\r\n")
        proxy.reactor.advance(29)
        self.assertEqual(proxy.response(), b"")
        proxy.reactor.advance(1)
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 408 Request Time-out")

    def test_a_body_is_not_timed_as_a_head(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        proxy.connect()
        for _ in range(10):  # 50 s
            proxy.reactor.advance(5)
            proxy.send(b"ab")
        self.assertEqual(proxy.response(), b"")
        self.assertFalse(proxy.client.disconnecting)

    def test_a_pipelined_head_is_timed_from_when_it_is_read(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        proxy.send(GET)
        proxy.connect()
        proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        proxy.send(b"GET /api/ps HTTP/1.1\r\n")  # kept by twisted.web while the answer goes
        proxy.reactor.advance(45)
        self.assertNotIn(b"408", proxy.response())
        proxy.answer(b"0\r\n\r\n")  # the answer ends: the next head is read now
        proxy.reactor.advance(29)
        self.assertNotIn(b"408", proxy.response())
        proxy.reactor.advance(1)
        self.assertIn(b"HTTP/1.1 408 Request Time-out", proxy.response())

    def test_connections_per_source_are_limited(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(max_connections_per_source=2))
        second = proxy.site.buildProtocol(proxy.client.getPeer())
        self.assertIsInstance(second, ProxyChannel)
        second.makeConnection(StringTransport(peerAddress=proxy.client.getPeer()))
        third = proxy.site.buildProtocol(proxy.client.getPeer())
        self.assertIsInstance(third, BusyAnswer, "answered 503 busy")
        self.assertIsInstance(proxy.site.buildProtocol(LAN), ProxyChannel, "another source")
        second.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsInstance(proxy.site.buildProtocol(proxy.client.getPeer()), ProxyChannel)

    def test_a_connection_over_the_cap_is_answered_busy(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(max_connections_per_source=1))
        busy = proxy.site.buildProtocol(proxy.client.getPeer())
        transport = StringTransport(peerAddress=proxy.client.getPeer())
        busy.makeConnection(transport)
        busy.dataReceived(GET)
        response = transport.value()
        line, message = error_of(response)
        self.assertEqual(line, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(header_values(response, b"retry-after"), [b"1"])
        self.assertEqual(header_values(response, b"x-ollana-error"), [b"busy"])
        self.assertEqual(
            message,
            "ollana: this server is busy: 198.18.0.50 has 1 connections open, the most it may",
        )
        self.assertEqual(proxy.reactor.tcpClients, [], "nothing went upstream")


# What Twisted writes for a malformed request, and the body we give it (its body runs to
# the close). If a Twisted upgrade changes its answer, these tests say so.
MALFORMED = (
    b"HTTP/1.1 400 Bad Request\r\n\r\n"
    b'{"error": "ollana: malformed request (request line, headers or chunked body)"}\n'
)


class BadInputTests(SynchronousTestCase):
    def answer_to(self, data: bytes) -> bytes:
        proxy = ProxyHarness(self)
        proxy.send(data)
        self.assertTrue(proxy.client.disconnecting)
        return proxy.response()

    def test_malformed_request_line(self) -> None:
        self.assertEqual(self.answer_to(b"NONSENSE\r\n\r\n"), MALFORMED)

    def test_malformed_headers(self) -> None:
        for bad in (b"No colon", b"Bad Name: x", b"Content-Length: 1x",
                    b"Transfer-Encoding: gzip"):  # fmt: skip
            self.assertEqual(self.answer_to(b"GET / HTTP/1.1\r\nHost: x\r\n" + bad + b"\r\n\r\n"),
                             MALFORMED, bad)  # fmt: skip

    def test_too_many_headers(self) -> None:
        many = b"".join(b"X-%d: y\r\n" % n for n in range(501))
        self.assertEqual(self.answer_to(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"),
                         MALFORMED)  # fmt: skip

    def test_malformed_requests_are_logged_once_a_minute(self) -> None:
        logged = capture_logs(self)
        proxy = ProxyHarness(self)
        proxy.send(b"NONSENSE\r\n\r\n")
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        for _ in range(9):
            channel = proxy.site.buildProtocol(proxy.client.getPeer())
            channel.makeConnection(StringTransport(peerAddress=proxy.client.getPeer()))
            channel.dataReceived(b"NONSENSE\r\n\r\n")
            channel.connectionLost(Failure(error.ConnectionDone()))
        lines = [e for e in logged if e.get("code") == 400]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["client"], "198.18.0.50")
        proxy.reactor.advance(60)
        self.assertEqual([e.get("repeated") for e in logged if e.get("code") == 400], [None, 9])

    def test_oversized_headers(self) -> None:
        big = b"X-Big: " + b"a" * 20000 + b"\r\n"
        answer = self.answer_to(b"GET / HTTP/1.1\r\n" + big + b"\r\n")
        line, message = error_of(answer)
        self.assertEqual(line, b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertEqual(message, "ollana: a request line or header is too long")

    def test_broken_chunked_encoding(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        upstream = proxy.connect()
        proxy.send(b"zz\r\nhello\r\n")
        self.assertEqual(proxy.response(), MALFORMED)
        self.assertTrue(proxy.client.disconnecting)
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(upstream.disconnecting, "the upstream request is dropped")

    def test_a_close_for_another_reason_gets_nothing_added(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
        proxy.channel.loseConnection()  # as a drain, or Request.loseConnection, would
        self.assertEqual(proxy.response(), b"")
        self.assertTrue(proxy.client.disconnecting)

    def test_a_response_that_ends_the_connection_gets_nothing_added(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"OPTIONS * HTTP/1.0\r\n\r\n")  # answered here, then closed
        response = proxy.response()
        self.assertTrue(response.startswith(b"HTTP/1.0 200 OK"), response)
        self.assertNotIn(b"error", response)
        self.assertTrue(proxy.client.disconnecting)

    def test_conflicting_lengths(self) -> None:
        answer = self.answer_to(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 9\r\n\r\nabc"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "))

    def test_a_body_shorter_than_declared_leaves_others_alone(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        upstream = proxy.connect()
        proxy.channel.connectionLost(Failure(error.ConnectionDone()))  # the liar leaves
        self.assertTrue(upstream.disconnecting)
        other = ProxyHarness(self)
        other.send(GET)
        self.assertEqual(len(other.reactor.tcpClients), 1)
        self.assertIsInstance(Headers(), Headers)


class SlowClientTests(SynchronousTestCase):
    def test_a_trickled_request_line_is_cut_off(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(header_timeout=30))
        for byte in b"GET /api/tags?x=12345678":  # 48 s in all
            proxy.send(bytes([byte]))
            proxy.reactor.advance(2)  # never quiet long enough for the channel's timeout
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 408 Request Time-out")

    def test_connections_in_all_are_limited(self) -> None:
        proxy = ProxyHarness(self, gate=Gate(max_connections=1))
        busy = proxy.site.buildProtocol(LAN)
        self.assertIsInstance(busy, BusyAnswer)
        transport = StringTransport(peerAddress=LAN)
        busy.makeConnection(transport)
        busy.dataReceived(GET)
        self.assertEqual(
            error_of(transport.value()),
            (
                b"HTTP/1.1 503 Service Unavailable",
                "ollana: this server is busy: 1 connections are open, the most it takes",
            ),
        )


class HostTests(SynchronousTestCase):
    def ask(self, host: bytes) -> bytes:
        proxy = ProxyHarness(self, gate=Gate(check_host=True), client=LOOPBACK)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        return head(proxy.response())[0] if proxy.response() else b"passed"

    def test_local_names_pass(self) -> None:
        for host in (b"localhost:11434", b"127.0.0.1:11434", b"[::1]:11434", b"box.local",
                     b"host.docker.internal", b"192.168.1.20"):  # fmt: skip
            self.assertEqual(self.ask(host), b"passed", host)

    def test_a_rebound_name_is_refused(self) -> None:
        self.assertEqual(self.ask(b"attacker.example:11434"), b"HTTP/1.1 403 Forbidden")

    def test_a_rebound_name_after_a_local_one_is_refused(self) -> None:
        headers = Headers({b"host": [b"localhost", b"attacker.example"]})
        self.assertEqual(Gate(check_host=True).refusal("127.0.0.1", headers),
                         (403, "ollana: this Host is not a local name or address"))  # fmt: skip
        headers = Headers({b"host": [b"attacker.example", b"localhost"]})
        self.assertIsNotNone(Gate(check_host=True).refusal("127.0.0.1", headers))


class HostRuleTests(SynchronousTestCase):
    """RFC 9112 3.2: HTTP/1.1 needs one Host header; no request may have more than one."""

    def ask(self, request: bytes) -> ProxyHarness:
        proxy = ProxyHarness(self)
        proxy.send(request)
        return proxy

    def test_http_1_1_without_host_is_400(self) -> None:
        proxy = self.ask(b"GET /api/tags HTTP/1.1\r\n\r\n")
        self.assertEqual(error_of(proxy.response()),
                         (b"HTTP/1.1 400 Bad Request",
                          "ollana: an HTTP/1.1 request must have a Host header"))  # fmt: skip
        self.assertEqual(proxy.reactor.tcpClients, [])
        self.assertTrue(proxy.client.disconnecting)

    def test_two_host_headers_are_400(self) -> None:
        for version in (b"HTTP/1.1", b"HTTP/1.0"):
            proxy = self.ask(b"GET /api/tags " + version + b"\r\nHost: a\r\nHost: a\r\n\r\n")
            message = "ollana: a request must have one Host header, not several"
            self.assertEqual(error_of(proxy.response()), (b"HTTP/1.1 400 Bad Request", message))
            self.assertEqual(proxy.reactor.tcpClients, [])

    def test_http_1_0_without_host_is_served(self) -> None:
        proxy = self.ask(b"GET /api/tags HTTP/1.0\r\n\r\n")
        self.assertEqual(proxy.response(), b"")
        self.assertEqual(len(proxy.reactor.tcpClients), 1)

    def test_our_own_pages_need_a_host_too(self) -> None:
        proxy = self.ask(b"GET /ollana/api/status HTTP/1.1\r\n\r\n")
        self.assertEqual(head(proxy.response())[0], b"HTTP/1.1 400 Bad Request")
