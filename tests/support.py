"""Test doubles for the network: a fake datagram transport and a reactor that hands them out.

``MemoryReactor`` has no UDP, so ``FakeNetworkReactor`` adds ``listenUDP`` and
``listenMulticast`` that return ``FakeDatagramPort`` objects. A test reads what a
protocol sent from ``port.written`` and feeds it datagrams with
``port.protocol.datagramReceived(data, addr)``. Time is the reactor's ``Clock``.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock


class FakeDatagramPort:
    """A bound UDP socket in memory: records writes; can be told to fail them."""

    def __init__(self, protocol: DatagramProtocol, port: int, interface: str = "") -> None:
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.broadcast_allowed = False
        self.listening = True
        self.write_error: OSError | None = None
        protocol.makeConnection(self)  # type: ignore[arg-type]

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append((data, addr))

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

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What was written since the last take."""
        written, self.written = self.written, []
        return written


class FakeNetworkReactor(MemoryReactorClock):
    """MemoryReactorClock with UDP; ports in use can be declared to test bind errors."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[FakeDatagramPort] = []
        self.busy_udp_ports: set[int] = set()
        self._next_port = 40000

    def listenUDP(  # type: ignore[override]
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

    def _bind(self, port: int, protocol: Any, interface: str) -> FakeDatagramPort:
        if port in self.busy_udp_ports:
            raise error.CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        if port == 0:
            self._next_port += 1
            port = self._next_port
        bound = FakeDatagramPort(protocol, port, interface)
        self.udp_ports.append(bound)
        return bound

    def udp_port(self, port: int) -> FakeDatagramPort:
        """The listening fake port bound to this number."""
        for bound in self.udp_ports:
            if bound.port == port and bound.listening:
                return bound
        raise LookupError(f"nothing listens on UDP port {port}")
