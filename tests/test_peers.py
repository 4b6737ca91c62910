"""The peer pool: announcements, byes, legacy and static servers, expiry."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from ollana import wire
from ollana.peers import PeerPool, Source
from tests.support import capture_logs

A = bytes(16)
B = bytes([1]) * 16


class PeerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = PeerPool(self.clock, ttl=15)
        self.events = capture_logs(self)

    def messages(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_level") == LogLevel.info]

    def test_announce_adds_a_discovered_peer(self) -> None:
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.assertEqual(peer.url, "http://198.18.0.2:11435")
        self.assertEqual(peer.node_id, A.hex())
        self.assertIs(peer.source, Source.DISCOVERED)
        self.assertTrue(peer.usable)
        self.assertEqual(list(self.pool), [peer])
        self.assertEqual(self.messages(), ["Found server {node} at {url} (Ollana {version})"])

    def test_refresh_updates_last_seen_without_logging_again(self) -> None:
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.clock.advance(10)
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.assertEqual(peer.last_seen, 10)
        self.assertEqual(len(self.pool), 1)
        self.assertEqual(len(self.messages()), 1)

    def test_moved_server_is_updated(self) -> None:
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.announced(wire.Announce(A, 8443, "https", "0.1.0"), "198.18.0.7")
        [peer] = self.pool
        self.assertEqual(peer.url, "https://198.18.0.7:8443")
        self.assertEqual(len(self.messages()), 2)

    def test_bye_removes(self) -> None:
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.announced(wire.Announce(B, 11435, "http", "0.1.0"), "198.18.0.3")
        self.assertEqual(self.pool.said_bye(A).host, "198.18.0.2")  # type: ignore[union-attr]
        self.assertEqual([p.host for p in self.pool], ["198.18.0.3"])
        self.assertIsNone(self.pool.said_bye(A))

    def test_silent_peers_expire_after_ttl(self) -> None:
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.legacy_replied("198.18.0.9")
        self.pool.add_static("ollama.example", 11435)
        self.clock.advance(15)
        self.assertEqual(self.pool.expire(), [])
        self.clock.advance(0.5)
        gone = self.pool.expire()
        self.assertEqual(sorted(p.host for p in gone), ["198.18.0.2", "198.18.0.9"])
        [static] = self.pool
        self.assertIs(static.source, Source.STATIC)
        self.assertEqual(static.url, "http://ollama.example:11435")

    def test_legacy_server_is_not_usable(self) -> None:
        peer = self.pool.legacy_replied("198.18.0.9")
        self.assertEqual(peer.url, "http://198.18.0.9:11435")
        self.assertIsNone(peer.node_id)
        self.assertFalse(peer.usable)
        self.pool.legacy_replied("198.18.0.9")
        self.assertEqual(len(self.pool), 1)

    def test_ipv6_url(self) -> None:
        self.assertEqual(self.pool.add_static("fd00::5", 11435).url, "http://[fd00::5]:11435")
