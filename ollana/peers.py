"""The pool of known Ollana servers: discovered, static and legacy ones."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ollana import wire

LEGACY_PORT = 11435


class Source(enum.Enum):
    DISCOVERED = "discovered"
    STATIC = "static"
    LEGACY = "legacy"


@dataclass
class Peer:
    """One Ollana server's proxy, as last heard of."""

    key: str
    host: str
    port: int
    scheme: str
    version: str
    source: Source
    last_seen: float

    @property
    def node_id(self) -> str | None:
        """The server's node id in hex, when it told us one."""
        return self.key if self.source is Source.DISCOVERED else None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def usable(self) -> bool:
        """Whether requests may be proxied to it (legacy servers drop headers)."""
        return self.source is not Source.LEGACY


class PeerPool:
    """Known servers by key; discovered and legacy ones expire when they fall silent."""

    log = Logger()

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self._clock = clock
        self.ttl = ttl
        self._peers: dict[str, Peer] = {}

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, key: str) -> Peer | None:
        return self._peers.get(key)

    def announced(self, message: wire.Announce, host: str) -> Peer:
        """Add or refresh the server that sent this announcement from host."""
        key = message.node_id.hex()
        peer = Peer(
            key,
            host,
            message.port,
            message.scheme,
            message.version,
            Source.DISCOVERED,
            self._clock.seconds(),
        )
        old = self._peers.get(key)
        self._peers[key] = peer
        if old is None or old.url != peer.url:
            self.log.info(
                "Found server {node} at {url} (Ollana {version})",
                node=key,
                url=peer.url,
                version=peer.version,
            )
        return peer

    def legacy_replied(self, host: str) -> Peer:
        """Record an original-Ollana server that answered a probe from host."""
        key = f"legacy:{host}"
        is_new = key not in self._peers
        peer = Peer(key, host, LEGACY_PORT, "http", "legacy", Source.LEGACY, self._clock.seconds())
        self._peers[key] = peer
        if is_new:
            self.log.info("Found legacy Ollana server at {url}", url=peer.url)
        return peer

    def add_static(self, host: str, port: int) -> Peer:
        """A server given on the command line: kept however long it stays silent."""
        key = f"static:{host}:{port}"
        peer = Peer(key, host, port, "http", "", Source.STATIC, self._clock.seconds())
        self._peers[key] = peer
        return peer

    def said_bye(self, node_id: bytes) -> Peer | None:
        """Forget a discovered server that announced it is going away."""
        peer = self._peers.pop(node_id.hex(), None)
        if peer is not None:
            self.log.info("Server {node} at {url} said bye", node=peer.key, url=peer.url)
        return peer

    def expire(self) -> list[Peer]:
        """Drop discovered and legacy servers not heard from for ttl seconds."""
        deadline = self._clock.seconds() - self.ttl
        gone = [
            peer
            for peer in self._peers.values()
            if peer.source is not Source.STATIC and peer.last_seen < deadline
        ]
        for peer in gone:
            del self._peers[peer.key]
            self.log.info(
                "Lost server {node} at {url}: silent for {ttl:.0f} s",
                node=peer.key,
                url=peer.url,
                ttl=self.ttl,
            )
        return gone
