"""The LANA discovery protocols: the server's responder and the client's seeker.

Servers listen on the shared discovery port (several processes on one host may),
answer probes by unicast, announce themselves by broadcast and say bye when they
stop. Clients send probes from a socket of their own, so the unicast replies come
back to them and not to whichever process shares the discovery port, and listen on
the shared port for unsolicited announcements and byes.

Given a PacketAuth, a protocol signs what it sends and ignores (counting it in
``rejected``) whatever is not signed with the same secret, stale or replayed, the
original Ollana's bare magic included. A responder answers only hosts its ``allowed``
predicate accepts, and each host at most ``reply_rate`` times a second (after a burst of
``reply_burst``), so that spoofed probes cannot turn it into an amplifier.

Nothing that arrives writes a log line per datagram above debug level: what is ignored is
counted by reason and told in one line a minute (``IgnoredDatagrams``), and failed sends
are told once and then counted (``ollana.logs.Summary``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, LogLevel

from ollana import wire
from ollana.auth import PacketAuth
from ollana.logs import Summary
from ollana.peers import LEGACY_PORT, PeerPool

Address = tuple[str, int]
Targets = Callable[[], list[Address]]
SUMMARY_INTERVAL = 60.0  # seconds between lines about ignored datagrams


class IgnoredDatagrams:
    """Datagrams ignored or left unanswered, counted by reason and source host, and told
    in one line per interval in which there were any: a flood is a line a minute."""

    MAX_HOSTS = 1000  # distinct hosts counted in an interval: spoofed ones are endless

    def __init__(
        self, log: Logger, clock: IReactorTime, interval: float = SUMMARY_INTERVAL
    ) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._reasons: Counter[str] = Counter()
        self._hosts: set[str] = set()
        self._started = 0.0
        self._due: IDelayedCall | None = None

    def count(self, reason: str, host: str) -> None:
        """One more datagram ignored for reason ("unsigned", "malformed"...)."""
        if self._due is None:
            self._started = self.clock.seconds()
            self._due = self.clock.callLater(self.interval, self._interval_ended)
        self._reasons[reason] += 1
        if len(self._hosts) < self.MAX_HOSTS:
            self._hosts.add(host)

    def _interval_ended(self) -> None:
        self._due = None
        try:
            self.flush()
        except Exception:
            self.log.failure("Error while counting ignored datagrams")

    def flush(self) -> None:
        """Tell what was counted since the interval began, if anything, and start afresh."""
        reasons, self._reasons = self._reasons, Counter()
        hosts, self._hosts = len(self._hosts), set()
        if not reasons:
            return
        count = sum(reasons.values())
        self.log.info(
            "Ignored {datagrams} from {sources} in the last {seconds:.0f} s: {reasons}",
            count=count,
            hosts=hosts,
            datagrams=f"{count:,} datagram{'s' if count > 1 else ''}",
            sources=_hosts(hosts, self.MAX_HOSTS),
            seconds=self.clock.seconds() - self._started,
            reasons=", ".join(f"{n:,} {reason}" for reason, n in reasons.most_common()),
        )

    def stop(self) -> None:
        """Tell what is counted and stop the timer (the socket is closing)."""
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()
        self.flush()


def _hosts(count: int, most: int) -> str:
    if count >= most:
        return f"{most:,} hosts or more"
    return "1 host" if count == 1 else f"{count:,} hosts"


class _LanaProtocol(DatagramProtocol):
    """Decodes datagrams, ignores our own, and never lets an error escape. ``clock``
    times the lines that sum up what was ignored or could not be sent."""

    log = Logger()
    noisy = False

    def __init__(
        self, node_id: bytes, *, clock: IReactorTime, auth: PacketAuth | None = None
    ) -> None:
        self.node_id = node_id
        self.auth = auth
        self.received = 0
        self.rejected = 0
        self.sent = 0
        self.last_send_error: str | None = None
        self.ignored = IgnoredDatagrams(self.log, clock)
        self._send_errors = Summary(self.log, clock, SUMMARY_INTERVAL, LogLevel.warn)

    def stopProtocol(self) -> None:
        self.ignored.stop()
        self._send_errors.stop()

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            packet = datagram if self.auth is None else self.auth.verify(datagram)
            message = wire.decode(packet)
        except wire.MalformedPacket as e:
            self.rejected += 1
            self.ignored.count(getattr(e, "category", "malformed"), addr[0])
            self.log.debug(
                "Ignored datagram from {host}:{port}: {reason}",
                host=addr[0],
                port=addr[1],
                reason=str(e),
            )
            return
        except Exception:
            self.rejected += 1
            self.log.failure("Error reading a datagram from {host}", host=addr[0])
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
        packet = wire.encode(message)
        if self.auth is not None:
            packet = self.auth.sign(packet)
        try:
            self.transport.write(packet, addr)
        except OSError as e:
            self.last_send_error = f"{addr[0]}:{addr[1]}: {e.strerror or e}"
            self._send_errors(
                "Cannot send discovery datagram to {host}:{port}: {error}",
                host=addr[0],
                port=addr[1],
                error=e.strerror or str(e),
            )
        else:
            self.sent += 1


class ReplyLimiter:
    """A token bucket per source host: at most ``rate`` replies a second after a burst.

    At most ``max_hosts`` hosts are tracked; hosts whose bucket has refilled are dropped
    to make room, and while none has, new hosts get no reply.
    """

    def __init__(
        self, now: Callable[[], float], rate: float, burst: int, max_hosts: int = 1024
    ) -> None:
        if not rate > 0 or burst < 1 or max_hosts < 1:
            raise ValueError("rate, burst and max_hosts must be positive")
        self._now = now
        self.rate = rate
        self.burst = burst
        self.max_hosts = max_hosts
        self._buckets: dict[str, tuple[float, float]] = {}  # host: (tokens, when)
        self._pruned = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str) -> bool:
        """Take a token from host's bucket: whether a reply to it may be sent now."""
        now = self._now()
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self.max_hosts and not self._make_room(now):
                return False
            tokens = float(self.burst)
        else:
            tokens, when = bucket
            tokens = min(float(self.burst), tokens + max(0.0, now - when) * self.rate)
        if tokens < 1:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1, now)
        return True

    def _make_room(self, now: float) -> bool:
        if now - self._pruned >= 1.0:  # a full scan at most once a second
            self._pruned = now
            self._buckets = {  # a host whose bucket has refilled is as good as new
                host: (tokens, when)
                for host, (tokens, when) in self._buckets.items()
                if now - when < (self.burst - tokens) / self.rate
            }
        return len(self._buckets) < self.max_hosts


class ProbeResponder(_LanaProtocol):
    """Server side: answers probes and announces this server, while it is serving.

    Probes from hosts that ``allowed`` refuses, or beyond a host's rate, get no reply;
    they are counted in ``refused`` and ``limited``. Announcements carry ``fingerprint``
    (the SHA-256 of the server's TLS certificate) when given. ``clock`` times the rate
    limit too.
    """

    def __init__(
        self,
        node_id: bytes,
        targets: Targets,
        scheme: str,
        version: str,
        is_serving: Callable[[], bool],
        *,
        clock: IReactorTime,
        auth: PacketAuth | None = None,
        allowed: Callable[[str], bool] = lambda host: True,
        fingerprint: bytes | None = None,
        reply_rate: float = 4.0,
        reply_burst: int = 8,
    ) -> None:
        super().__init__(node_id, clock=clock, auth=auth)
        if fingerprint is not None and len(fingerprint) != wire.FINGERPRINT_SIZE:
            raise ValueError(f"fingerprint must be {wire.FINGERPRINT_SIZE} bytes")
        self.targets = targets
        self.scheme = scheme
        self.version = version
        self.is_serving = is_serving
        self.allowed = allowed
        self.fingerprint = fingerprint
        self.proxy_port: int | None = None
        self.limiter = ReplyLimiter(clock.seconds, reply_rate, reply_burst)
        self.refused = 0
        self.limited = 0

    def _announcement(self) -> wire.Announce | None:
        if self.proxy_port is None or not self.is_serving():
            return None
        return wire.Announce(
            self.node_id, self.proxy_port, self.scheme, self.version, self.fingerprint
        )

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.Probe):
            reply: wire.Message | None = self._announcement()
        elif isinstance(message, wire.LegacyHello):
            # Original clients probe from a port of their own. From the discovery port
            # it is an original server answering our broadcast: answering that back
            # would start an endless exchange.
            if addr[1] == self._own_port() or self._announcement() is None:
                return
            reply = message
        else:
            return
        if reply is None:
            return
        if not self.allowed(addr[0]):
            self.refused += 1
            self.ignored.count("from hosts not allowed", addr[0])
            self.log.debug("No reply to {host}: not an allowed source", host=addr[0])
        elif not self.limiter.allow(addr[0]):
            self.limited += 1
            self.ignored.count("over the reply rate", addr[0])
            self.log.debug("No reply to {host}: over its rate", host=addr[0])
        else:
            self.send(reply, addr)

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

    def __init__(
        self,
        node_id: bytes,
        pool: PeerPool,
        *,
        clock: IReactorTime,
        auth: PacketAuth | None = None,
    ) -> None:
        super().__init__(node_id, clock=clock, auth=auth)
        self.pool = pool

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.Announce):
            if self.pool.believes(addr[0], message.node_id.hex(), message.port):
                self.pool.announced(message, addr[0])
            else:
                self.ignored.count("announcements not believed", addr[0])
        elif isinstance(message, wire.Bye):
            self.pool.said_bye(message.node_id)
        # Probes, bare or not, come from other clients: nothing to do.


class Seeker(AnnouncementListener):
    """Client side, on a socket of its own: sends probes and records the replies."""

    def __init__(
        self,
        node_id: bytes,
        pool: PeerPool,
        targets: Targets,
        *,
        clock: IReactorTime,
        auth: PacketAuth | None = None,
    ) -> None:
        super().__init__(node_id, pool, clock=clock, auth=auth)
        self.targets = targets

    def probe(self) -> None:
        """Send one probe to every broadcast target."""
        for target in self.targets():
            self.send(wire.Probe(self.node_id), target)

    def handle(self, message: wire.Message, addr: Address) -> None:
        if isinstance(message, wire.LegacyHello):
            # On our own socket a bare magic is an original Ollana server's reply.
            if self.pool.believes(addr[0], f"legacy:{addr[0]}", LEGACY_PORT):
                self.pool.legacy_replied(addr[0])
            else:
                self.ignored.count("announcements not believed", addr[0])
        else:
            super().handle(message, addr)
