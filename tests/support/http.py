"""HTTP in memory: upstream connections a test accepts one at a time on a
``MemoryReactorClock`` (``FakeUpstreams``), a proxy site with one client connection in
front of them (``ProxyHarness``), a resource that never answers, and readers of raw HTTP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ollana.gate import Gate
from ollana.proxy import ProxySettings
from ollana.site import ProxySite
from ollana.upstream import NoUpstream, Router, Upstream, make_agent

CLIENT = IPv4Address("TCP", "198.18.0.50", 40000)
UPSTREAM = Upstream("http://127.0.0.1:11434", peer="198.18.0.2:11435")


class FakeUpstreams:
    """The connections an HTTP client opens on ``reactor``, accepted or refused one at a
    time; each accepted one is a StringTransport, answered by feeding bytes to its protocol.
    """

    lost: type[Exception] = error.ConnectionDone  # what lose() reports by default

    def __init__(self, reactor: MemoryReactorClock, timeout: float = 5) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.handled = 0  # connection attempts accepted or refused so far
        self.protocols: list[Any] = []
        self.transports: list[StringTransport] = []

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def connect(
        self, port: int = 11434, transport: StringTransport | None = None
    ) -> StringTransport:
        """Accept the next connection attempt, which must go to 127.0.0.1:port."""
        host, to, factory, timeout, _ = self.reactor.tcpClients[self.handled]
        assert (host, to, timeout) == ("127.0.0.1", port, self.timeout), (host, to, timeout)
        self.handled += 1
        address = IPv4Address("TCP", host, port)
        protocol: Any = factory.buildProtocol(address)
        if transport is None:
            transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return transport

    def refuse(self, port: int = 11434, reason: Exception | None = None) -> None:
        """Fail the next connection attempt (refused, unless told)."""
        host, to, factory, _, _ = self.reactor.tcpClients[self.handled]
        assert (host, to) == ("127.0.0.1", port), (host, to)
        connector = self.reactor.connectors[self.handled]
        self.handled += 1
        factory.clientConnectionFailed(connector, Failure(reason or error.ConnectionRefusedError()))

    def answer(self, data: bytes, index: int = -1) -> None:
        self.protocols[index].dataReceived(data)

    def lose(self, index: int = -1, reason: Exception | None = None) -> None:
        """The connection ends, as a real transport reports it: its producer dropped first,
        then ``lost`` (unless told) to the protocol."""
        transport = self.transports[index]
        if transport.producer is not None:
            transport.unregisterProducer()
        self.protocols[index].connectionLost(Failure(reason or self.lost()))


class Scripted(Router):
    """One upstream; or NoUpstream when there is none; or a chooser that breaks."""

    def __init__(self, upstream: Upstream | Exception | None) -> None:
        super().__init__()
        self.outcome = upstream

    def candidates(self, model: str | None, key: str | None = None) -> list[Upstream]:
        if self.outcome is None:
            raise NoUpstream("ollana: no Ollama server found on the LAN yet")
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return [self.outcome]


class ProxyHarness(FakeUpstreams):
    """A proxy site with one client connection, and the upstream connections it opens."""

    lost = error.ConnectionLost

    def __init__(
        self,
        case: SynchronousTestCase,
        upstream: Upstream | Exception | Router | None = UPSTREAM,
        gate: Gate | None = None,
        client: IPv4Address = CLIENT,
    ) -> None:
        super().__init__(MemoryReactorClock())
        agent = self.agent = make_agent(self.reactor, connect_timeout=5)
        router = upstream if isinstance(upstream, Router) else Scripted(upstream)
        settings = ProxySettings(agent, router, self.reactor, gate=gate or Gate())
        self.site = ProxySite(settings)
        self.channel = self.site.buildProtocol(client)
        self.client = StringTransport(peerAddress=client)
        self.channel.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> bytes:
        return self.client.value()


class Silent(Resource):
    """Accepts requests and never answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


def producer(transport: StringTransport) -> Any:
    """What a transport would pause when its buffer fills."""
    assert transport.producer is not None
    return transport.producer


def head(data: bytes) -> tuple[bytes, list[bytes]]:
    """The first line and header lines of an HTTP message."""
    lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return lines[0], lines[1:]


def after_head(data: bytes) -> bytes:
    """The body of an HTTP message, as sent."""
    return data.split(b"\r\n\r\n", 1)[1]


def header_values(data: bytes, name: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[1].strip()
        for line in head(data)[1]
        if line.split(b":", 1)[0].lower() == name.lower()
    ]
