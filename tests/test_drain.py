"""Stopping gracefully: no new connections, requests under way finish, the rest is closed
after the drain timeout; and a real twistd process that does so on SIGTERM."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, error, task
from twisted.internet import reactor as _reactor
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support.fake_ollama import FakeOllama
from tests.support.http import CLIENT, ProxyHarness
from tests.support.processes import ChildProcess, free_udp_port

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = ProxyHarness(self)
        self.proxy.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.upstream = self.proxy.connect()
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.idle = self.proxy.site.buildProtocol(CLIENT)
        self.idle_transport = StringTransport(peerAddress=CLIENT)
        self.idle.makeConnection(self.idle_transport)

    def lose(self, channel: Any) -> None:
        channel.connectionLost(Failure(error.ConnectionDone()))

    def test_streams_finish_and_idle_connections_close(self) -> None:
        drained = self.proxy.site.drain(30)
        self.assertTrue(self.idle_transport.disconnecting, "idle: closed at once")
        self.assertFalse(self.proxy.client.disconnecting, "busy: left to finish")
        self.lose(self.idle)
        self.assertNoResult(drained)
        self.proxy.answer(b"3\r\ndef\r\n0\r\n\r\n")
        response = self.proxy.response()
        self.assertTrue(response.endswith(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"), response)
        self.assertTrue(self.proxy.client.disconnecting, "closed after its response")
        self.lose(self.proxy.channel)
        self.assertIsNone(self.successResultOf(drained))
        timers = [repr(call) for call in self.proxy.reactor.getDelayedCalls()]
        self.assertEqual([t for t in timers if "drain" in t], [], "no drain timer left")

    def test_what_is_still_open_after_the_timeout_is_closed(self) -> None:
        drained = self.proxy.site.drain(30)
        self.lose(self.idle)
        self.proxy.reactor.advance(29)
        self.assertFalse(self.proxy.client.disconnecting)
        self.proxy.reactor.advance(1)
        self.assertTrue(self.proxy.client.disconnecting)
        self.lose(self.proxy.channel)
        self.successResultOf(drained)

    def test_a_connection_accepted_as_the_drain_begins_is_served_once(self) -> None:
        drained = self.proxy.site.drain(30)
        late = self.proxy.site.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        late.makeConnection(transport)
        self.assertFalse(transport.disconnecting, "its request is still to come")
        late.dataReceived(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.connect()
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\n{}"), response)
        self.assertTrue(transport.disconnecting, "closed after its one request")
        self.lose(late)
        self.lose(self.idle)
        self.proxy.answer(b"0\r\n\r\n", index=0)
        self.lose(self.proxy.channel)
        self.successResultOf(drained)

    def test_a_head_half_in_as_the_drain_begins_is_answered_then_closed(self) -> None:
        channel = self.proxy.site.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")
        self.proxy.site.drain(30)
        self.assertFalse(transport.disconnecting, "a request under way")
        channel.dataReceived(b"Accept: */*\r\n\r\n")  # a head that says keep-alive
        self.proxy.connect()
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        response = transport.value()
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\n{}"), response)
        self.assertTrue(transport.disconnecting, "closed after its answer")

    def test_nothing_open_is_drained_at_once(self) -> None:
        self.lose(self.idle)
        self.lose(self.proxy.channel)
        self.successResultOf(self.proxy.site.drain(30))


class ClosedPoolTests(SynchronousTestCase):
    def test_a_connection_freed_after_the_pool_closed_is_closed(self) -> None:
        proxy = ProxyHarness(self)
        proxy.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream = proxy.connect()
        proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        proxy.agent.closeCachedConnections()  # Ollana stops while the response is under way
        proxy.answer(b"cd")
        self.assertTrue(proxy.response().endswith(b"abcd"))
        self.assertTrue(upstream.disconnecting, "not kept for requests that will not come")


class GracefulStopTests(TestCase):
    timeout = 60

    async def test_sigterm_lets_a_stream_finish(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        fake.gated = True
        ollama = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")
        self.addCleanup(ollama.stopListening)
        server = ChildProcess.spawn(reactor, [
            *TWISTD, "-n", "--pidfile=", "ollana", "--mode", "server",
            "--listen", "tcp:0:interface=127.0.0.1", "--broadcast", "127.255.255.255",
            "--discovery-port", str(free_udp_port()), "--drain-timeout", "20",
            "--ollama", f"http://127.0.0.1:{ollama.getHost().port}",
        ])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        port = (await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")).group(1)
        url = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        streaming = treq.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "a b c"},
                              pool=pool)  # fmt: skip
        fake.release()
        response = await streaming
        server.signal("TERM")
        await server.wait_for(r"Letting 1 request\(s\) finish, for up to 20 s")
        await refused(url + "/api/version", pool)  # the port closes as the drain begins
        for _ in range(3):
            fake.release()
        lines = (await response.content()).splitlines()
        self.assertEqual([json.loads(line)["done"] for line in lines], [False] * 3 + [True])
        self.assertEqual(await server.when_ended(), None)  # twistd's own SIGTERM exit
        self.assertNotIn("Traceback", server.output())
        self.assertNotIn("still open", server.output())


async def refused(url: str, pool: HTTPConnectionPool, within: float = 5) -> None:
    """Wait until connections to url are refused (answers until then are fine)."""
    for _ in range(int(within / 0.05)):
        try:
            response = await treq.get(url, pool=pool)
        except error.ConnectionRefusedError:
            return
        await response.content()
        await task.deferLater(reactor, 0.05)
    raise AssertionError(f"{url} still accepts connections after {within} s")
