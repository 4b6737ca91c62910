"""The LANA discovery protocols: the server's responder and the client's seeker.

Servers listen on the shared discovery port (several processes on one host may),
answer probes by unicast, announce themselves by broadcast and say bye when they
stop. Clients send probes from a socket of their own, so the unicast replies come
back to them and not to whichever process shares the discovery port, and listen on
the shared port for unsolicited announcements and byes.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ollana import wire
from ollana.peers import PeerPool

Address = tuple[str, int]
Targets = Callable[[], list[Address]]


class _LanaProtocol(DatagramProtocol):
    """Decodes datagrams, ignores our own, and never lets an error escape."""

    log = Logger()
    noisy = False

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id
        self.received = 0
        self.rejected = 0
        self.sent = 0
        self.last_send_error: str | None = None

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            message = wire.decode(datagram)
        except wire.MalformedPacket as e:
            self.rejected += 1
            self.log.debug(
                "Ignored datagram from {host}:{port}: {reason}",
                host=addr[0],
                port=addr[1],
                reason=str(e),
            )
            return
        if getattr(message, "node_id", None) == self.node_id:
            return
        self.received += 1
        self.log.debug(
            "{kind} from {host}:{port}",
            kind=type(message).__name__,
            host=addr[0],
            port=addr[1],
        )
        try:
            self.handle(message, addr)
        except Exception:
            self.log.failure("Error handling a datagram from {host}", host=addr[0])

    def handle(self, message: wire.Message, addr: Address) -> None:
        raise NotImplementedError

    def send(self, message: wire.Message, addr: Address) -> None:
        """Send, logging (not raising) errors such as ENETUNREACH."""
        if self.transport is None:
            return
        try:
            self.transport.write(wire.encode(message), addr)
        except OSError as e:
            self.last_send_error = f"{addr[0]}:{addr[1]}: {e.strerror or e}"
            self.log.warn(
                "Cannot send discovery datagram to {host}:{port}: {error}",
                host=addr[0],
                port=addr[1],
                error=e.strerror or str(e),
            )
        else:
            self.sent += 1


class ProbeResponder(_LanaProtocol):
    """Server side: answers probes and announces this server, while it is serving."""

    def __init__(
        self,
        node_id: bytes,
        targets: Targets,
        scheme: str,
        version: str,
        is_serving: Callable[[], bool],
    ) -> None:
        super().__init__(node_id)
        self.targets = targets
        self.scheme = scheme
        self.version = version
        self.is_serving = is_serving
        self.proxy_port: int | None = None

    def _announcement(self) -> wire.Announce | None:
        if self.proxy_port is None or not self.is_serving():
            return None
        return wire.Announce(self.node_id, self.proxy_port, self.scheme, self.version)

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.Probe):
            announcement = self._announcement()
            if announcement is not None:
                self.send(announcement, addr)
        elif isinstance(message, wire.LegacyHello):
            # Original clients probe from a port of their own. From the discovery port
            # it is an original server answering our broadcast: answering that back
            # would start an endless exchange.
            if self._announcement() is not None and addr[1] != self._own_port():
                self.send(message, addr)

    def _own_port(self) -> int | None:
        return getattr(self.transport.getHost(), "port", None) if self.transport else None

    def announce(self) -> None:
        """Tell every broadcast target that this server is here."""
        announcement = self._announcement()
        if announcement is not None:
            for target in self.targets():
                self.send(announcement, target)

    def bye(self) -> None:
        """Tell every broadcast target that this server is going away."""
        for target in self.targets():
            self.send(wire.Bye(self.node_id), target)


class AnnouncementListener(_LanaProtocol):
    """Client side, on the shared port: records announcements and byes in the pool."""

    def __init__(self, node_id: bytes, pool: PeerPool) -> None:
        super().__init__(node_id)
        self.pool = pool

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.Announce):
            self.pool.announced(message, addr[0])
        elif isinstance(message, wire.Bye):
            self.pool.said_bye(message.node_id)
        # Probes, bare or not, come from other clients: nothing to do.


class Seeker(AnnouncementListener):
    """Client side, on a socket of its own: sends probes and records the replies."""

    def __init__(self, node_id: bytes, pool: PeerPool, targets: Targets) -> None:
        super().__init__(node_id, pool)
        self.targets = targets

    def probe(self) -> None:
        """Send one probe to every broadcast target."""
        for target in self.targets():
            self.send(wire.Probe(self.node_id), target)

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.LegacyHello):
            # On our own socket a bare magic is an original Ollana server's reply.
            self.pool.legacy_replied(addr[0])
        else:
            super().handle(message, addr)
