"""A finished request leaves nothing of Ollana's in reference cycles: its objects are
freed as it ends, not by Python's cyclic collector, whose full passes over a busy node
stall every stream it carries for tens of milliseconds (docs/benchmarks.rst)."""

from __future__ import annotations

from collections import Counter

from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.garbage import Cycles
from tests.support.http import ProxyHarness

GENERATE = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

# What each request makes. (The site, its channels and the upstream client are made once,
# or once a connection, and are the harness's here.)
PER_REQUEST = {
    "ollana.site.ProxyRequest",
    "ollana.proxy.Exchange",
    "ollana.proxy.RequestBody",
    "ollana.proxy.ResponseRelay",
    "ollana.idle.IdleTimer",
    "ollana.upstream.Upstream",
    "ollana.httpclient.UpstreamResponse",
    "ollana.httpclient._ResponseTransport",
    "ollana.httpclient.BodyWriter",
}


def lose_client(proxy: ProxyHarness, reason: Exception) -> None:
    """The client's connection is gone, as a real transport reports it: its producer (the
    channel) dropped first."""
    if proxy.client.producer is not None:
        proxy.client.unregisterProducer()
    proxy.channel.connectionLost(Failure(reason))


class RelayedRequestTests(SynchronousTestCase):
    """Each test drops the whole harness at the end, so that whatever a request left in a
    cycle is found, reachable from the harness or not."""

    def assertNothingLeft(self, cycles: Cycles) -> None:
        left = Counter({name: n for name, n in cycles.left.items() if name in PER_REQUEST})
        self.assertEqual(left, Counter(), "objects left for the cyclic collector")

    def test_a_stream_relayed_whole(self) -> None:
        with Cycles() as cycles:
            proxy = ProxyHarness(self)
            for _ in range(3):  # the connections' first requests, and kept-alive ones
                proxy.send(GENERATE)
                if proxy.handled == 0:
                    proxy.connect()
                proxy.answer(STREAM_HEAD + b"3\r\nabc\r\n")
                proxy.answer(b"3\r\ndef\r\n0\r\n\r\n")
            self.assertEqual(proxy.response().count(b"0\r\n\r\n"), 3, "three answers, whole")
            lose_client(proxy, error.ConnectionDone())
            del proxy
        self.assertNothingLeft(cycles)

    def test_a_client_that_leaves_mid_stream(self) -> None:
        with Cycles() as cycles:
            proxy = ProxyHarness(self)
            proxy.send(GENERATE)
            upstream = proxy.connect()
            proxy.answer(STREAM_HEAD + b"3\r\nabc\r\n")
            lose_client(proxy, error.ConnectionLost())
            self.assertTrue(upstream.disconnecting, "the upstream is dropped with it")
            proxy.lose()
            del proxy, upstream
        self.assertNothingLeft(cycles)

    def test_an_upstream_that_breaks_off(self) -> None:
        with Cycles() as cycles:
            proxy = ProxyHarness(self)
            proxy.send(GENERATE)
            proxy.connect()
            proxy.answer(STREAM_HEAD + b"3\r\nabc\r\n")
            proxy.lose(reason=error.ConnectionLost())
            self.assertTrue(proxy.client.disconnecting, "a cut answer is not passed as whole")
            lose_client(proxy, error.ConnectionLost())
            del proxy
        self.assertNothingLeft(cycles)

    def test_an_upstream_that_refuses(self) -> None:
        with Cycles() as cycles:
            proxy = ProxyHarness(self)
            proxy.send(GENERATE)
            proxy.refuse()
            self.assertIn(b" 502 ", proxy.response().split(b"\r\n", 1)[0])
            lose_client(proxy, error.ConnectionDone())
            del proxy
        self.assertNothingLeft(cycles)

    def test_an_upload_the_upstream_answers_early(self) -> None:
        with Cycles() as cycles:
            proxy = ProxyHarness(self)
            proxy.send(b"POST /api/blobs/sha256:0 HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 10\r\n\r\n01234")  # fmt: skip
            upstream = proxy.connect()
            proxy.answer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.assertTrue(upstream.disconnected, "aborted: it waited for the body's rest")
            proxy.lose()
            proxy.send(b"56789")
            self.assertIn(b" 400 ", proxy.response().split(b"\r\n", 1)[0])
            lose_client(proxy, error.ConnectionDone())
            del proxy, upstream
        self.assertNothingLeft(cycles)


class Node:
    other: Node | None = None


class CyclesTests(SynchronousTestCase):
    """The helper finds what it is for, and only that."""

    def test_a_cycle_is_found(self) -> None:
        with Cycles(__name__) as cycles:
            a, b, c = Node(), Node(), Node()
            a.other, b.other, c.other = b, a, a  # a and b: a cycle; c, only refcounted
            del a, b, c
        self.assertEqual(cycles.left, Counter({f"{__name__}.Node": 2}))
