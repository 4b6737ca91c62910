"""Test doubles: a fake datagram transport and a reactor that hands them out, fake Ollama
probes over several simulated Ollamas, and log capture.

``MemoryReactor`` has no UDP, so ``FakeNetworkReactor`` adds ``listenUDP`` and
``listenMulticast`` (IReactorUDP, IReactorMulticast) that return ``FakeDatagramPort``
objects. A test reads what a protocol sent from ``port.written`` and feeds it datagrams
with ``port.protocol.datagramReceived(data, addr)``. Time is the reactor's ``Clock``.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IListeningPort,
    IMulticastTransport,
    IProtocol,
    IReactorMulticast,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from zope.interface import implementer

from ollana.demo import free_udp_port as free_udp_port  # the demo's own, for tests too
from tests.support.fake_ollama import FakeOllama


def capture_logs(case: SynchronousTestCase) -> EventLoggingObserver:
    """Log events emitted during the test, as a list of event dicts."""
    return EventLoggingObserver.createWithCleanup(case, globalLogPublisher)  # type: ignore[arg-type]


@implementer(IListeningPort, IUDPTransport, IMulticastTransport)
class FakeDatagramPort:
    """A bound UDP socket in memory: records writes; can be told to fail them. (It joins
    no multicast group: discovery broadcasts.)"""

    def __init__(self, protocol: DatagramProtocol, port: int, interface: str = "") -> None:
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.broadcast_allowed = False
        self.listening = True
        self.write_error: OSError | None = None
        protocol.makeConnection(self)

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        if self.write_error is not None:
            raise self.write_error
        assert addr is not None, "discovery's sockets are not connected"
        self.written.append((data, addr))

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError("discovery's sockets are not connected")

    def startListening(self) -> None:
        """Bound when made."""

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast_allowed = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast_allowed

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.protocol.doStop()

    loseConnection = stopListening

    def getOutgoingInterface(self) -> str:
        return self.interface

    def setOutgoingInterface(self, addr: str | int) -> defer.Deferred[int]:
        return defer.succeed(1)

    def getLoopbackMode(self) -> bool:
        return True

    def setLoopbackMode(self, mode: bool) -> None:
        pass

    def getTTL(self) -> int:
        return 1

    def setTTL(self, ttl: int) -> None:
        pass

    def joinGroup(self, addr: str, interface: str = "") -> defer.Deferred[None]:
        return defer.succeed(None)

    def leaveGroup(self, addr: str, interface: str = "") -> defer.Deferred[None]:
        return defer.succeed(None)

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What was written since the last take."""
        written, self.written = self.written, []
        return written


@implementer(IReactorUDP, IReactorMulticast)
class FakeNetworkReactor(MemoryReactorClock):
    """MemoryReactorClock with UDP; ports in use can be declared to test bind errors."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[FakeDatagramPort] = []
        self.busy_udp_ports: set[int] = set()
        self.udp_write_error: OSError | None = None
        self._next_port = 40000

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeDatagramPort:
        return self._bind(port, protocol, interface)

    def listenMulticast(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeDatagramPort:
        return self._bind(port, protocol, interface)

    def _bind(self, port: int, protocol: DatagramProtocol, interface: str) -> FakeDatagramPort:
        if port in self.busy_udp_ports:
            raise error.CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        if port == 0:
            self._next_port += 1
            port = self._next_port
        bound = FakeDatagramPort(protocol, port, interface)
        bound.write_error = self.udp_write_error
        self.udp_ports.append(bound)
        return bound

    def udp_port(self, port: int) -> FakeDatagramPort:
        """The listening fake port bound to this number."""
        for bound in self.udp_ports:
            if bound.port == port and bound.listening:
                return bound
        raise LookupError(f"nothing listens on UDP port {port}")


class FakeResponse:
    """What OllamaProbe reads of a response: the status, and the body, delivered at once
    as an IResponse does (over ``transport``, which tells whether it was stopped)."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body
        self.transport = StringTransport()

    def deliverBody(self, protocol: IProtocol) -> None:
        protocol.makeConnection(self.transport)
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeServers:
    """An HTTP getter (what OllamaProbe needs) over several fake Ollamas, by base URL.

    A base URL (``http://host:port``) answers from the FakeOllama added for it, unless
    ``answers`` holds a (status, JSON) for its (base, path). Base URLs in ``refusing``
    refuse connections, those in ``raising`` make ``get`` itself raise, those in
    ``hanging`` (URLs too) never answer; ``cancelled`` lists the URLs whose request was
    cancelled. ``delays`` makes a base URL answer that many seconds later on the clock.
    ``asked`` lists (clock time, URL) of every GET.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.ollamas: dict[str, FakeOllama] = {}
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.refusing: set[str] = set()
        self.raising: dict[str, Exception] = {}
        self.hanging: set[str] = set()
        self.delays: dict[str, float] = {}
        self.asked: list[tuple[float, str]] = []
        self.cancelled: list[str] = []

    def add(
        self, base: str, models: list[str] | None = None, version: str = "0.12.3"
    ) -> FakeOllama:
        """A FakeOllama answering at base."""
        fake = FakeOllama(version=version, models=models)
        self.ollamas[base] = fake
        return fake

    def times(self, path: str = "/api/version", base: str = "") -> list[float]:
        """When GETs of path (to base, or to any server) were made."""
        return [when for when, url in self.asked if url.startswith(base) and url.endswith(path)]

    def get(
        self, url: str, /, headers: Mapping[bytes, list[bytes]] | None = None
    ) -> defer.Deferred[Any]:
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        self.asked.append((self.clock.seconds(), url))
        if base in self.raising:
            raise self.raising[base]
        if base in self.refusing:
            return defer.fail(error.ConnectionRefusedError())
        if base in self.hanging or url in self.hanging:
            return defer.Deferred(lambda _: self.cancelled.append(url))
        delay = self.delays.get(base, 0.0)
        if delay:
            later: Any = task.deferLater(self.clock, delay, self._answer, base, parts.path, url)
            return later
        return self._answer(base, parts.path, url)

    def _answer(self, base: str, path: str, url: str) -> defer.Deferred[Any]:
        if (base, path) in self.answers:
            code, body = self.answers[base, path]
            return defer.succeed(FakeResponse(code, json.dumps(body).encode("utf-8")))
        if base not in self.ollamas:
            return defer.fail(error.ConnectionRefusedError())
        stub: Any = StubTreq(self.ollamas[base].resource())
        return stub.get(url)
