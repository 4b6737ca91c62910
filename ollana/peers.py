"""The pool of known Ollana servers (discovered, static and legacy ones), their health and
load, and the choice of servers for a request."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from ollana import wire
from ollana.interfaces import IServerState

LEGACY_PORT = 11435
STRATEGIES = ("fastest", "least-connections", "round-robin")
MAX_PEERS = 256  # servers known at once: see PeerPool.believes
MAX_PEERS_PER_HOST = 16  # servers known at one address: one host cannot fill the pool
FOUND_LINES = 8  # "Found server" lines at info per FOUND_INTERVAL; the rest are counted
FOUND_INTERVAL = 60.0
LATENCY_WEIGHT = 0.3  # of the newest check in the moving average
SAME_LATENCY_SHARE = 0.25  # latencies this much above the best, plus
SAME_LATENCY_SECONDS = 0.005  # this much, are as fast as the best
# Outlier ejection, as Envoy does it: a server that fails this many requests in a row is
# left out for EJECT_SECONDS times the number of times it has been (up to EJECT_MAX), even
# while its health checks pass (a server that fails fast must not look idle and draw more).
EJECT_AFTER = 3
EJECT_SECONDS = 10.0
EJECT_MAX = 300.0
RECENT_FAILURE = 10.0  # seconds a failed request makes a server the last choice (ttft)


class Source(enum.Enum):
    DISCOVERED = "discovered"
    STATIC = "static"
    LEGACY = "legacy"


def host_port(host: object, port: object) -> str:
    """host:port, with an IPv6 host in brackets."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def model_key(name: str) -> str:
    """A model name as Ollama matches it: no tag means ``:latest``; case does not matter."""
    name = name.strip().lower()
    if ":" not in name.rpartition("/")[2]:
        name += ":latest"
    return name


@dataclass(eq=False)
class Peer:
    """One Ollana server's proxy, as last heard of, with its health and load."""

    key: str
    host: str
    port: int
    scheme: str
    version: str
    source: Source
    last_seen: float
    healthy: bool = True  # until checks say otherwise: servers announce only when healthy
    failures: int = 0  # consecutive failed checks
    reason: str = ""  # why it is unhealthy
    latency: float | None = None  # moving average of check round trips, in seconds
    last_ok: float | None = None  # when a check last succeeded
    next_check: float = 0.0  # not checked again before this (backoff)
    active: int = 0  # requests being proxied to it, streams included
    total_requests: int = 0  # requests ever sent to it
    models: frozenset[str] = field(default_factory=frozenset)  # model_key()s
    models_checked: float | None = None
    fingerprint: bytes | None = None  # SHA-256 of its TLS certificate, as announced
    state: IServerState | None = None  # its last report
    unreported: int = 0  # requests this client sent it since that report
    unreported_models: dict[str, int] = field(default_factory=dict)  # the same, by model
    request_failures: int = 0  # requests it failed in a row
    failed_at: float = float("-inf")  # when it last failed one
    ejections: int = 0  # times it was ejected, less one per request served since
    ejected_until: float = 0.0  # left out of the choice until then

    @property
    def node_id(self) -> str | None:
        """The server's node id in hex, when it told us one."""
        return self.key if self.source is Source.DISCOVERED else None

    @property
    def address(self) -> str:
        """host:port, with an IPv6 host in brackets (as X-Ollana-Peer shows it)."""
        return host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def usable(self) -> bool:
        """Whether requests may be proxied to it (legacy servers drop headers)."""
        return self.source is not Source.LEGACY


class LineQuota:
    """Lets ``burst`` log lines of one kind through per ``interval`` seconds and counts the
    rest, so that a flood of them is a few lines and a count."""

    def __init__(self, clock: IReactorTime, burst: int, interval: float) -> None:
        self._clock = clock
        self.burst = burst
        self.interval = interval
        self._ends = float("-inf")
        self._let_through = 0
        self._held = 0

    def take(self) -> bool:
        """Whether one more line may be logged now; if not, it is counted as held back."""
        now = self._clock.seconds()
        if now >= self._ends:
            self._ends, self._let_through, self._held = now + self.interval, 0, 0
        if self._let_through < self.burst:
            self._let_through += 1
            return True
        self._held += 1
        return False

    def held_back(self) -> int:
        """The lines held back in an interval that has ended, once (then 0)."""
        if self._held and self._clock.seconds() >= self._ends:
            held, self._held = self._held, 0
            return held
        return 0


class PeerPool:
    """Known servers by key; discovered and legacy ones expire when they fall silent.
    Announcements are believed only from the sources ``admits`` names (by default, all)."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float,
        unhealthy_after: int = 2,
        admits: Callable[[str], bool] = lambda host: True,
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        self.unhealthy_after = unhealthy_after
        self._admits = admits
        self._peers: dict[str, Peer] = {}
        self._turn = -1
        self._found_lines = LineQuota(clock, FOUND_LINES, FOUND_INTERVAL)
        self._added_watchers: list[Callable[[Peer], object]] = []
        self._down_watchers: list[Callable[[Peer, str], object]] = []

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, key: str) -> Peer | None:
        return self._peers.get(key)

    def believes(self, host: str, key: str, port: int) -> bool:
        """Whether to take in what host says of the server key at port: only from sources
        a server would admit, and only if room can be made for it (see _room_for)."""
        return self._admits(host) and self._room_for(key, host, port) is not None

    def _room_for(self, key: str, host: str, port: int) -> list[Peer] | None:
        """The peers that must go for the server key to be at host:port (often none), or
        None if it may not be: one server per address, MAX_PEERS_PER_HOST per host and
        MAX_PEERS in all. Only a peer that gives way (see _gives_way) goes: the one at that
        address, else the oldest at that host or, when the pool is full, the oldest that
        never passed a check."""
        peer = self._peers.get(key)
        if peer is not None and ((peer.host, peer.port) == (host, port) or self._answers(peer)):
            return []  # a refresh, or a server that stays where it answers (see announced)
        at_host = [p for p in self._peers.values() if p.host == host and p is not peer]
        at_host = [p for p in at_host if p.source is not Source.STATIC]
        gone = [p for p in at_host if p.port == port]
        if not all(self._gives_way(p) for p in gone):
            return None
        if len(at_host) - len(gone) >= MAX_PEERS_PER_HOST:
            oldest = next((p for p in at_host if p not in gone and self._gives_way(p)), None)
            if oldest is None:
                return None
            gone.append(oldest)
        if peer is None and len(self._peers) - len(gone) >= MAX_PEERS:
            # _gives_way for peers never checked OK, inline: every datagram of a flood of
            # new ids asks this of a full pool (46 instead of 160 us a datagram).
            legacy, discovered = Source.LEGACY, Source.DISCOVERED
            oldest = next((p for p in self._peers.values() if p.last_ok is None
                           and (p.source is legacy or (p.failures and p.source is discovered))
                           and p not in gone), None)  # fmt: skip
            if oldest is None:
                return None
            gone.append(oldest)
        return gone

    def _answers(self, peer: Peer) -> bool:
        """Whether health checks reach the peer lately: announcements never displace it."""
        return (
            peer.healthy
            and peer.last_ok is not None
            and peer.last_ok > self._clock.seconds() - self.ttl
        )

    def _gives_way(self, peer: Peer) -> bool:
        """Whether an announcement may take the peer's place: a legacy one (never checked),
        or a discovered one that does not answer, once a check has told so. (Not one still
        waiting for its first check: else announcements could start checks, each with a
        socket, faster than checks end.)"""
        if peer.source is Source.LEGACY:
            return True
        checked = peer.failures > 0 or peer.last_ok is not None
        return peer.source is Source.DISCOVERED and checked and not self._answers(peer)

    def announced(self, message: wire.Announce, host: str) -> Peer:
        """Add or refresh the server that sent this announcement from host, in place of
        the peers that give way to it (the discovery listener asks ``believes`` first)."""
        key = message.node_id.hex()
        self._tell_found_lines_held()
        for gone in self._room_for(key, host, message.port) or ():
            del self._peers[gone.key]
            self.log.debug("Server {node} at {url} gives way to {new}",
                           node=gone.key, url=gone.url, new=key)  # fmt: skip
        peer = self._peers.get(key)
        if peer is None:
            peer = Peer(key, host, message.port, message.scheme, message.version,
                        Source.DISCOVERED, self._clock.seconds(),
                        fingerprint=message.fingerprint)  # fmt: skip
            self._peers[key] = peer
            self._added(peer)
        else:
            peer.last_seen = self._clock.seconds()
            if (peer.host, peer.port, peer.scheme) == (host, message.port, message.scheme):
                peer.version = message.version
                peer.fingerprint = message.fingerprint
                return peer
            if self._answers(peer):
                # It still answers where it is: the same id from elsewhere is a server
                # with two interfaces, or a replayed datagram. Either way, stay.
                return peer
            peer.fingerprint = message.fingerprint
            peer.host, peer.port, peer.scheme = host, message.port, message.scheme
            self._added(peer)  # somewhere new: check it there at once
        peer.version = message.version
        self.log.emit(
            LogLevel.info if self._found_lines.take() else LogLevel.debug,
            "Found server {node} at {url} (Ollana {version})",
            node=key,
            url=peer.url,
            version=peer.version,
        )
        return peer

    def _tell_found_lines_held(self) -> None:
        """Say how many "Found server" lines an ended interval held back, if any."""
        held = self._found_lines.held_back()
        if held:
            self.log.info(
                "Found {count} more servers within {interval:g} s (not logged one by one: "
                "ollana status lists the servers)",
                count=held,
                interval=self._found_lines.interval,
            )

    def legacy_replied(self, host: str) -> Peer:
        """Record an original-Ollana server that answered a probe from host (the
        discovery listener asks ``believes`` first)."""
        key = f"legacy:{host}"
        peer = self._peers.get(key)
        if peer is not None:
            peer.last_seen = self._clock.seconds()
            return peer
        peer = Peer(key, host, LEGACY_PORT, "http", "legacy", Source.LEGACY, self._clock.seconds())
        self._peers[key] = peer
        self.log.info("Found legacy Ollana server at {url}", url=peer.url)
        return peer

    def add_static(self, host: str, port: int, scheme: str = "http") -> Peer:
        """A server given on the command line: kept however long it stays silent."""
        key = f"static:{host}:{port}"
        if key not in self._peers:
            self._peers[key] = Peer(key, host, port, scheme, "", Source.STATIC,
                                    self._clock.seconds())  # fmt: skip
            self._added(self._peers[key])
        return self._peers[key]

    def watch_added(self, watcher: Callable[[Peer], object]) -> None:
        """Call watcher(peer) whenever a discovered or static server is added, or one moves
        to another address (the health checker checks it there at once)."""
        self._added_watchers.append(watcher)

    def _added(self, peer: Peer) -> None:
        for watcher in list(self._added_watchers):
            watcher(peer)

    def said_bye(self, node_id: bytes) -> Peer | None:
        """Forget a discovered server that announced it is going away."""
        peer = self._peers.pop(node_id.hex(), None)
        if peer is not None:
            self.log.info("Server {node} at {url} said bye", node=peer.key, url=peer.url)
        return peer

    def expire(self) -> list[Peer]:
        """Drop discovered and legacy servers not heard from for ttl seconds, unless health
        checks still reach them (their announcements may be what gets lost)."""
        deadline = self._clock.seconds() - self.ttl
        gone = [
            peer
            for peer in self._peers.values()
            if peer.source is not Source.STATIC
            and peer.last_seen < deadline
            and not (peer.healthy and peer.last_ok is not None and peer.last_ok >= deadline)
        ]
        for peer in gone:
            del self._peers[peer.key]
            self.log.info(
                "Lost server {node} at {url}: silent for {ttl:.0f} s",
                node=peer.key,
                url=peer.url,
                ttl=self.ttl,
            )
            for watcher in list(self._down_watchers):  # what still waits there never will
                watcher(peer, f"lost: silent for {self.ttl:.0f} s")
        return gone

    # Health, as the checker and the proxy find it.

    def check_succeeded(self, peer: Peer, latency: float) -> bool:
        """Record a good check; True when the peer has just recovered."""
        peer.last_ok = self._clock.seconds()
        peer.failures = 0
        peer.reason = ""
        peer.next_check = 0.0
        if peer.latency is None:
            peer.latency = latency
        else:
            peer.latency += LATENCY_WEIGHT * (latency - peer.latency)
        if peer.healthy:
            return False
        peer.healthy = True
        self.log.info("Server {url} is healthy again", url=peer.url)
        return True

    def check_failed(self, peer: Peer, reason: str) -> None:
        """Record a failed check: unhealthy after unhealthy_after of them in a row. The
        requests still waiting there are then told (watch_down), at each failed check."""
        peer.failures += 1
        peer.reason = reason
        if peer.healthy and peer.failures >= self.unhealthy_after:
            self._mark_down(peer, reason)
        if not peer.healthy:
            for watcher in list(self._down_watchers):
                watcher(peer, reason)

    def watch_down(self, watcher: Callable[[Peer, str], object]) -> None:
        """Call watcher(peer, reason) whenever a health check fails on an unhealthy peer."""
        self._down_watchers.append(watcher)

    def suspect(self, peer: Peer, reason: str) -> None:
        """A request could not reach the peer: no more requests until a check succeeds."""
        peer.failures = max(peer.failures, self.unhealthy_after)
        peer.reason = reason
        peer.next_check = 0.0
        if peer.healthy:
            self._mark_down(peer, reason)

    def request_failed(self, peer: Peer, reason: str) -> None:
        """The peer failed a request (it could not be reached, or answered with a server
        error): after EJECT_AFTER in a row it is ejected, for longer each time."""
        peer.request_failures += 1
        peer.failed_at = self._clock.seconds()
        if peer.request_failures < EJECT_AFTER:
            return
        peer.request_failures = 0
        peer.ejections += 1
        seconds = min(EJECT_SECONDS * peer.ejections, EJECT_MAX)
        peer.ejected_until = self._clock.seconds() + seconds
        self.log.warn(
            "Server {url} failed {count} requests in a row ({reason}): not used for {seconds:g} s",
            url=peer.url, count=EJECT_AFTER, reason=reason, seconds=seconds,
        )  # fmt: skip

    def request_succeeded(self, peer: Peer) -> None:
        """The peer served a request: its failures in a row end, and so does any doubt
        about its health (a check will confirm)."""
        peer.request_failures = 0
        if peer.ejections and self._clock.seconds() >= peer.ejected_until:
            peer.ejections -= 1
        if not peer.healthy:
            peer.healthy = True
            peer.failures = 0
            peer.reason = ""
            self.log.info("Server {url} is answering again", url=peer.url)

    def recently_failed(self, peer: Peer) -> bool:
        """Whether the peer's last request failed, not long ago."""
        return peer.request_failures > 0 and self._clock.seconds() - peer.failed_at < RECENT_FAILURE

    def ejected(self, peer: Peer) -> bool:
        """Whether the peer is left out of the choice for failing requests."""
        return peer.ejected_until > self._clock.seconds()

    def _mark_down(self, peer: Peer, reason: str) -> None:
        peer.healthy = False
        self.log.warn("Server {url} is unhealthy: {reason}", url=peer.url, reason=reason)

    def fingerprint(self, host: str, port: int) -> bytes | None:
        """The TLS certificate fingerprint announced for the https server at host:port,
        when every server announced there agrees on one."""
        prints = {peer.fingerprint for peer in self._peers.values()
                  if (peer.host, peer.port, peer.scheme) == (host, port, "https")}  # fmt: skip
        return prints.pop() if len(prints) == 1 else None

    # Choosing.

    def why_none(self) -> str:
        """Why no server can be offered, in the words of an error for the user."""
        if any(peer.source is Source.LEGACY for peer in self._peers.values()):
            return (
                "ollana: only original (legacy) Ollana servers were found; they cannot be "
                "proxied to, upgrade them to this Ollana"
            )
        return "ollana: no Ollama server found on the LAN yet"

    def eligible(self, model: str | None = None) -> tuple[list[Peer], bool]:
        """The usable peers a request may go to, and whether they are healthy ones.

        Healthy ones that are not ejected; when a model is named and some of them have it,
        only those. When every healthy peer is ejected, those all the same (never eject the
        last one: Envoy's "panic"). With no healthy peer, the unhealthy ones, last good
        first (False): a try may still succeed where a refusal would certainly fail.
        """
        usable = [peer for peer in self._peers.values() if peer.usable]
        healthy = [peer for peer in usable if peer.healthy]
        if not healthy:
            return sorted(usable, key=lambda p: -(p.last_ok or float("-inf"))), False
        healthy = [peer for peer in healthy if not self.ejected(peer)] or healthy
        if model is not None:
            wanted = model_key(model)
            having = [peer for peer in healthy if wanted in peer.models]
            healthy = having or healthy
        return healthy, True

    def candidates(self, strategy: str, model: str | None = None) -> list[Peer]:
        """The eligible peers in the order of one of the strategies that know nothing of
        the servers' load (ollana.strategy has the one that does)."""
        healthy, ok = self.eligible(model)
        if not ok:
            return healthy
        if strategy == "least-connections":
            return sorted(healthy, key=lambda p: (p.active, _latency(p), p.key))
        if strategy == "round-robin":
            ordered = sorted(healthy, key=lambda p: p.key)
            self._turn = (self._turn + 1) % len(ordered)
            return ordered[self._turn :] + ordered[: self._turn]
        return _fastest(healthy)


def _latency(peer: Peer) -> float:
    return float("inf") if peer.latency is None else peer.latency


def _fastest(peers: list[Peer]) -> list[Peer]:
    """Lowest latency first; latencies within noise of the best (a LAN's are all about a
    millisecond) count as a tie, broken by fewest active requests, so that concurrent
    streams spread over equally fast servers instead of piling onto one."""
    best = min(_latency(peer) for peer in peers)
    band = best * (1 + SAME_LATENCY_SHARE) + SAME_LATENCY_SECONDS
    tied = sorted(
        (p for p in peers if _latency(p) <= band), key=lambda p: (p.active, _latency(p), p.key)
    )
    rest = sorted(
        (p for p in peers if _latency(p) > band), key=lambda p: (_latency(p), p.active, p.key)
    )
    return tied + rest
