"""The peer pool: announcements, byes, legacy and static servers, expiry."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from ollana import wire
from ollana.peers import (
    EJECT_AFTER,
    EJECT_MAX,
    EJECT_SECONDS,
    LATENCY_WEIGHT,
    MAX_PEERS,
    MAX_PEERS_PER_HOST,
    Peer,
    PeerPool,
    Source,
    model_key,
)
from tests.support.fakes import capture_logs

A = bytes(16)
B = bytes([1]) * 16
C = bytes([2]) * 16
START = 1000.0  # the clock of the tests below starts here: no check ever happens at time 0
NO_SERVER = "ollana: no Ollama server found on the LAN yet"
ONLY_LEGACY = (
    "ollana: only original (legacy) Ollana servers were found; they cannot be "
    "proxied to, upgrade them to this Ollana"
)


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

    def test_watchers_hear_of_servers_added_or_moved(self) -> None:
        added: list[tuple[str, str]] = []
        self.pool.watch_added(lambda peer: added.append((peer.key, peer.host)))
        self.pool.watch_added(lambda peer: added.append(("again", peer.host)))
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")  # refresh
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.7")  # moved
        self.pool.legacy_replied("198.18.0.9")  # never checked
        self.pool.add_static("gpu", 11435)
        self.pool.add_static("gpu", 11435)  # known already
        self.assertEqual(
            added,
            [(A.hex(), "198.18.0.2"), ("again", "198.18.0.2"),
             (A.hex(), "198.18.0.7"), ("again", "198.18.0.7"),
             ("static:gpu:11435", "gpu"), ("again", "gpu")],
        )  # fmt: skip

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
        peer = self.pool.add_static("fd00::5", 11435)
        self.assertEqual(peer.url, "http://[fd00::5]:11435")
        self.assertEqual(peer.address, "[fd00::5]:11435")


class PoolTestCase(SynchronousTestCase):
    """A pool on a clock at START, with a few ways to make servers."""

    unhealthy_after = 2

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = PeerPool(self.clock, ttl=15, unhealthy_after=self.unhealthy_after)
        self.events = capture_logs(self)

    def static(self, name: str, latency: float | None = None, active: int = 0) -> Peer:
        peer = self.pool.add_static(f"{name}.example", 11435)
        if latency is not None:
            self.pool.check_succeeded(peer, latency)
        peer.active = active
        return peer

    def down(self, peer: Peer, reason: str = "connection refused") -> None:
        for _ in range(self.pool.unhealthy_after):
            self.pool.check_failed(peer, reason)
        self.assertFalse(peer.healthy)

    def logged(self, level: LogLevel) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_level") == level]


class HealthTests(PoolTestCase):
    def test_unhealthy_only_after_two_consecutive_failures_by_default(self) -> None:
        self.assertEqual(PeerPool(self.clock, ttl=15).unhealthy_after, 2)
        peer = self.static("a", latency=0.1)
        self.pool.check_failed(peer, "connection refused")
        self.assertEqual((peer.healthy, peer.failures), (True, 1))
        self.assertEqual(self.pool.candidates("fastest"), [peer])
        self.pool.check_failed(peer, "no answer within 2 s")
        self.assertEqual((peer.healthy, peer.failures), (False, 2))
        self.assertEqual(peer.reason, "no answer within 2 s")

    def test_the_threshold_is_the_pools(self) -> None:
        pool = PeerPool(self.clock, ttl=15, unhealthy_after=3)
        peer = pool.add_static("a.example", 11435)
        pool.check_failed(peer, "x")
        pool.check_failed(peer, "x")
        self.assertTrue(peer.healthy)
        pool.check_failed(peer, "x")
        self.assertFalse(peer.healthy)

    def test_a_success_between_failures_starts_the_count_again(self) -> None:
        peer = self.static("a")
        self.pool.check_failed(peer, "connection refused")
        self.pool.check_succeeded(peer, 0.1)
        self.assertEqual(peer.failures, 0)
        self.pool.check_failed(peer, "connection refused")
        self.assertTrue(peer.healthy)
        self.assertEqual(peer.failures, 1)

    def test_more_failures_keep_it_down_and_count(self) -> None:
        peer = self.static("a")
        self.down(peer)
        self.pool.check_failed(peer, "HTTP 500 from /api/version")
        self.assertEqual((peer.healthy, peer.failures), (False, 3))
        self.assertEqual(peer.reason, "HTTP 500 from /api/version")
        self.assertEqual(self.logged(LogLevel.warn), ["Server {url} is unhealthy: {reason}"])

    def test_one_success_recovers(self) -> None:
        peer = self.static("a")
        self.down(peer)
        self.pool.check_failed(peer, "connection refused")
        peer.next_check = START + 40
        self.clock.advance(3)
        self.assertTrue(self.pool.check_succeeded(peer, 0.2))
        self.assertTrue(peer.healthy)
        self.assertEqual((peer.failures, peer.reason, peer.next_check), (0, "", 0.0))
        self.assertEqual(peer.last_ok, START + 3)
        self.assertEqual(self.pool.candidates("fastest"), [peer])
        self.assertEqual(self.logged(LogLevel.info)[-1], "Server {url} is healthy again")

    def test_check_succeeded_is_true_only_on_recovery(self) -> None:
        peer = self.static("a")
        self.assertFalse(self.pool.check_succeeded(peer, 0.1))
        self.pool.check_failed(peer, "connection refused")
        self.assertFalse(self.pool.check_succeeded(peer, 0.1), "one failure is not a fall")
        self.down(peer)
        self.assertTrue(self.pool.check_succeeded(peer, 0.1))
        self.assertFalse(self.pool.check_succeeded(peer, 0.1))
        self.assertEqual(self.logged(LogLevel.info).count("Server {url} is healthy again"), 1)

    def test_latency_is_a_moving_average(self) -> None:
        peer = self.static("a")
        self.assertIsNone(peer.latency)
        self.pool.check_succeeded(peer, 0.1)
        self.assertAlmostEqual(peer.latency, 0.1)
        self.pool.check_succeeded(peer, 0.2)
        self.assertAlmostEqual(LATENCY_WEIGHT, 0.3)
        self.assertAlmostEqual(peer.latency, 0.13)
        self.pool.check_succeeded(peer, 0.2)
        self.assertAlmostEqual(peer.latency, 0.151)
        self.pool.check_failed(peer, "connection refused")
        self.assertAlmostEqual(peer.latency, 0.151)
        for _ in range(40):
            self.pool.check_succeeded(peer, 1.0)
        self.assertAlmostEqual(peer.latency, 1.0, places=4)


class SuspectTests(PoolTestCase):
    def test_suspect_takes_a_healthy_server_out_at_once(self) -> None:
        a = self.static("a", latency=0.1)
        b = self.static("b", latency=0.5)
        self.pool.suspect(a, "connection reset")
        self.assertFalse(a.healthy)
        self.assertEqual((a.reason, a.failures), ("connection reset", 2))
        self.assertEqual(self.pool.candidates("fastest"), [b])
        self.assertEqual(self.logged(LogLevel.warn), ["Server {url} is unhealthy: {reason}"])

    def test_suspect_makes_it_due_for_a_check(self) -> None:
        peer = self.static("a")
        self.down(peer)
        self.pool.check_failed(peer, "connection refused")
        peer.next_check = START + 40
        self.pool.suspect(peer, "connection reset")
        self.assertEqual(peer.next_check, 0.0)
        self.assertEqual(peer.failures, 3, "the count of failures is not lowered")
        self.assertEqual(peer.reason, "connection reset")
        self.assertEqual(len(self.logged(LogLevel.warn)), 1, "a server already down")

    def test_one_success_after_a_suspicion_recovers(self) -> None:
        peer = self.static("a", latency=0.1)
        self.pool.suspect(peer, "connection reset")
        self.assertTrue(self.pool.check_succeeded(peer, 0.1))
        self.assertTrue(peer.healthy)


class EjectionTests(PoolTestCase):
    """Servers that fail requests in a row are left out for a while, longer each time."""

    def test_ejected_after_failures_in_a_row_for_longer_each_time(self) -> None:
        a, b = self.static("a", 0.01), self.static("b", 0.5)
        for times in (1, 2, 3):
            for _ in range(EJECT_AFTER - 1):
                self.pool.request_failed(a, "HTTP 500")
            self.assertEqual(self.pool.candidates("fastest"), [a, b])
            self.pool.request_failed(a, "HTTP 500")
            self.assertEqual(self.pool.candidates("fastest"), [b], times)
            self.clock.advance(EJECT_SECONDS * times - 0.1)
            self.assertEqual(self.pool.candidates("fastest"), [b], times)
            self.clock.advance(0.1)
            self.assertEqual(self.pool.candidates("fastest"), [a, b], times)
        self.assertEqual(len(self.logged(LogLevel.warn)), 3)

    def test_health_checks_that_pass_do_not_end_an_ejection(self) -> None:
        a, b = self.static("a", 0.01), self.static("b", 0.5)
        for _ in range(EJECT_AFTER):
            self.pool.request_failed(a, "HTTP 502 (unreachable)")
        self.pool.check_succeeded(a, 0.01)
        self.assertEqual(self.pool.candidates("fastest"), [b])

    def test_a_success_in_between_resets_the_count(self) -> None:
        a = self.static("a", 0.01)
        self.static("b", 0.5)
        for _ in range(5):
            for _ in range(EJECT_AFTER - 1):
                self.pool.request_failed(a, "HTTP 500")
            self.pool.request_succeeded(a)
        self.assertFalse(self.pool.ejected(a))

    def test_served_requests_shorten_the_next_ejection(self) -> None:
        a = self.static("a", 0.01)
        self.static("b", 0.5)
        for _ in range(2 * EJECT_AFTER):
            self.pool.request_failed(a, "HTTP 500")
        self.assertEqual(a.ejections, 2)
        self.clock.advance(EJECT_SECONDS * 2)
        self.pool.request_succeeded(a)
        for _ in range(EJECT_AFTER):
            self.pool.request_failed(a, "HTTP 500")
        self.assertEqual(a.ejected_until, self.clock.seconds() + EJECT_SECONDS * 2)

    def test_ejection_is_capped(self) -> None:
        a = self.static("a", 0.01)
        for _ in range(100 * EJECT_AFTER):
            self.pool.request_failed(a, "HTTP 500")
        self.assertEqual(a.ejected_until, self.clock.seconds() + EJECT_MAX)

    def test_never_the_last_server_panic(self) -> None:
        a, b = self.static("a", 0.01), self.static("b", 0.5)
        for peer in (a, b):
            for _ in range(EJECT_AFTER):
                self.pool.request_failed(peer, "HTTP 500")
        self.assertEqual(self.pool.candidates("fastest"), [a, b], "all ejected: all used")

    def test_a_request_served_brings_an_unhealthy_server_back(self) -> None:
        a = self.static("a", 0.01)
        self.down(a)
        self.pool.request_succeeded(a)
        self.assertTrue(a.healthy)
        self.assertEqual((a.failures, a.reason), (0, ""))

    def test_a_server_lost_to_silence_is_told(self) -> None:
        told: list[tuple[Peer, str]] = []
        self.pool.watch_down(lambda peer, reason: told.append((peer, reason)))
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.clock.advance(16)
        self.assertEqual(self.pool.expire(), [peer])
        self.assertEqual(told, [(peer, "lost: silent for 15 s")])

    def test_failed_checks_on_an_unhealthy_server_are_told(self) -> None:
        a = self.static("a", 0.01)
        told: list[tuple[Peer, str]] = []
        self.pool.watch_down(lambda peer, reason: told.append((peer, reason)))
        self.pool.check_failed(a, "no answer within 3 s")
        self.assertEqual(told, [], "still healthy")
        self.pool.check_failed(a, "no answer within 3 s")
        self.pool.check_failed(a, "connection refused")
        self.assertEqual(told, [(a, "no answer within 3 s"), (a, "connection refused")])


class ExpireTests(PoolTestCase):
    def announce(self, node: bytes, host: str) -> Peer:
        return self.pool.announced(wire.Announce(node, 11435, "http", "0.1.0"), host)

    def test_a_silent_server_that_checks_still_reach_is_kept(self) -> None:
        peer = self.announce(A, "198.18.0.2")
        self.clock.advance(10)
        self.pool.check_succeeded(peer, 0.1)
        self.clock.advance(15)  # silent for 25 s, reached 15 s ago
        self.assertEqual(self.pool.expire(), [])
        self.assertEqual(list(self.pool), [peer])
        self.clock.advance(0.5)
        self.assertEqual(self.pool.expire(), [peer])
        self.assertEqual(len(self.pool), 0)

    def test_a_silent_unhealthy_server_is_dropped_though_reached_lately(self) -> None:
        peer = self.announce(A, "198.18.0.2")
        self.clock.advance(10)
        self.pool.check_succeeded(peer, 0.1)
        self.clock.advance(5)
        self.down(peer)
        self.clock.advance(1)  # silent for 16 s, reached 6 s ago, but down
        self.assertEqual(self.pool.expire(), [peer])
        self.assertIsNone(self.pool.get(peer.key))

    def test_a_silent_server_never_checked_is_dropped(self) -> None:
        peer = self.announce(A, "198.18.0.2")
        self.clock.advance(15.5)
        self.assertTrue(peer.healthy)
        self.assertEqual(self.pool.expire(), [peer])

    def test_announcements_keep_a_server_unreached_by_checks(self) -> None:
        peer = self.announce(A, "198.18.0.2")
        self.down(peer)
        for _ in range(5):
            self.clock.advance(10)
            self.announce(A, "198.18.0.2")
            self.assertEqual(self.pool.expire(), [])
        self.assertEqual(list(self.pool), [peer])

    def test_static_servers_never_expire(self) -> None:
        healthy = self.static("a", latency=0.1)
        unhealthy = self.static("b")
        self.down(unhealthy)
        self.clock.advance(1e6)
        self.assertEqual(self.pool.expire(), [])
        self.assertEqual(list(self.pool), [healthy, unhealthy])


class AnnouncedTests(PoolTestCase):
    def test_announcements_refresh_the_server_in_place(self) -> None:
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.clock.advance(1)
        self.pool.check_succeeded(peer, 0.25)
        self.down(peer)
        peer.active = 2
        peer.models = frozenset({"llama3.2:latest"})
        peer.models_checked = START + 1
        self.clock.advance(4)
        again = self.pool.announced(wire.Announce(A, 11435, "http", "0.2.0"), "198.18.0.2")
        self.assertIs(again, peer)
        self.assertEqual((peer.last_seen, peer.version), (START + 5, "0.2.0"))
        self.assertFalse(peer.healthy, "an announcement is no health check")
        self.assertEqual((peer.failures, peer.reason), (2, "connection refused"))
        self.assertEqual((peer.latency, peer.last_ok, peer.active), (0.25, START + 1, 2))
        self.assertEqual(peer.models, frozenset({"llama3.2:latest"}))
        self.assertEqual(peer.models_checked, START + 1)

    def test_a_moved_server_stays_the_same_peer(self) -> None:
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        peer.active = 1
        moved = self.pool.announced(wire.Announce(A, 8443, "https", "0.1.0"), "198.18.0.7")
        self.assertIs(moved, peer)
        self.assertEqual((peer.url, peer.active), ("https://198.18.0.7:8443", 1))
        self.assertEqual(len(self.pool), 1)


class StrategyTests(PoolTestCase):
    def test_fastest_orders_by_latency(self) -> None:
        slow = self.static("a", latency=0.5)
        fast = self.static("b", latency=0.01)
        middle = self.static("c", latency=0.1, active=5)
        self.assertEqual(self.pool.candidates("fastest"), [fast, middle, slow])

    def test_fastest_counts_latencies_within_noise_as_a_tie(self) -> None:
        # 1.0 ms and 1.4 ms are the same on a LAN: the idle one first.
        busy = self.static("a", latency=0.0010, active=4)
        idle = self.static("b", latency=0.0014, active=0)
        far = self.static("c", latency=0.0070, active=0)  # beyond 1.25 x 1 ms + 5 ms
        self.assertEqual(self.pool.candidates("fastest"), [idle, busy, far])
        busy.active = 0
        self.assertEqual(self.pool.candidates("fastest"), [busy, idle, far])

    def test_fastest_breaks_ties_by_fewest_active(self) -> None:
        busy = self.static("a", latency=0.1, active=3)
        idle = self.static("b", latency=0.1, active=0)
        some = self.static("c", latency=0.1, active=1)
        self.assertEqual(self.pool.candidates("fastest"), [idle, some, busy])

    def test_fastest_puts_unknown_latency_last(self) -> None:
        unknown = self.static("a")
        slow = self.static("b", latency=9.0, active=4)
        self.assertEqual(self.pool.candidates("fastest"), [slow, unknown])

    def test_least_connections_orders_by_active_then_latency(self) -> None:
        fast_busy = self.static("a", latency=0.01, active=2)
        slow_idle = self.static("b", latency=0.5, active=0)
        one = self.static("c", latency=0.3, active=1)
        fast_idle = self.static("d", latency=0.1, active=0)
        self.assertEqual(
            self.pool.candidates("least-connections"), [fast_idle, slow_idle, one, fast_busy]
        )

    def test_round_robin_rotates(self) -> None:
        a = self.static("a", latency=0.5)
        b = self.static("b", latency=0.1)
        c = self.static("c", latency=0.3, active=9)
        orders = [self.pool.candidates("round-robin") for _ in range(4)]
        self.assertEqual(orders, [[a, b, c], [b, c, a], [c, a, b], [a, b, c]])

    def test_round_robin_rotates_over_the_healthy_ones(self) -> None:
        a = self.static("a", latency=0.1)
        b = self.static("b", latency=0.1)
        c = self.static("c", latency=0.1)
        self.down(b)
        firsts = [self.pool.candidates("round-robin")[0] for _ in range(4)]
        self.assertEqual(firsts, [a, c, a, c])

    def test_every_strategy_leaves_out_the_unhealthy_while_some_are_healthy(self) -> None:
        fast = self.static("a", latency=0.01)
        slow = self.static("b", latency=0.9)
        self.down(fast)
        for strategy in ("fastest", "least-connections", "round-robin"):
            self.assertEqual(self.pool.candidates(strategy), [slow], strategy)

    def test_with_none_healthy_the_unhealthy_come_last_good_first(self) -> None:
        never = self.static("a")
        older = self.static("b", latency=0.01)
        self.clock.advance(10)
        newer = self.static("c", latency=0.5)
        for peer in (never, older, newer):
            self.down(peer)
        for strategy in ("fastest", "least-connections", "round-robin"):
            self.assertEqual(self.pool.candidates(strategy), [newer, older, never], strategy)
            self.assertEqual(self.pool.candidates(strategy, "qwen3"), [newer, older, never])

    def test_legacy_servers_are_never_candidates(self) -> None:
        self.pool.legacy_replied("198.18.0.9")
        self.assertEqual(self.pool.candidates("fastest"), [])
        self.assertEqual(self.pool.why_none(), ONLY_LEGACY)
        static = self.static("a")
        self.down(static)
        for strategy in ("fastest", "least-connections", "round-robin"):
            self.assertEqual(self.pool.candidates(strategy), [static], strategy)
            self.assertEqual(self.pool.candidates(strategy, "llama3.2"), [static], strategy)

    def test_why_none_with_no_server(self) -> None:
        self.assertEqual(self.pool.candidates("fastest"), [])
        self.assertEqual(self.pool.why_none(), NO_SERVER)
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.said_bye(A)
        self.assertEqual(self.pool.candidates("round-robin"), [])
        self.assertEqual(self.pool.why_none(), NO_SERVER)
        self.assertIsNone(self.pool.get(peer.key))

    def test_why_none_forgets_legacy_servers_that_expired(self) -> None:
        self.pool.legacy_replied("198.18.0.9")
        self.clock.advance(16)
        self.pool.expire()
        self.assertEqual(self.pool.why_none(), NO_SERVER)


class ModelTests(PoolTestCase):
    def having(self, name: str, latency: float, *models: str) -> Peer:
        peer = self.static(name, latency=latency)
        peer.models = frozenset(model_key(m) for m in models)
        return peer

    def test_model_key(self) -> None:
        self.assertEqual(model_key("llama3.2"), "llama3.2:latest")
        self.assertEqual(model_key(" Qwen3:8B "), "qwen3:8b")
        self.assertEqual(model_key("hf.co/Org/Model"), "hf.co/org/model:latest")
        self.assertEqual(
            model_key("registry.example:5000/team/model"), "registry.example:5000/team/model:latest"
        )
        self.assertEqual(
            model_key("registry.example:5000/team/model:q4"),
            model_key("REGISTRY.example:5000/team/model:Q4"),
        )

    def test_only_the_servers_having_the_model(self) -> None:
        fast = self.having("a", 0.01, "llama3.2:latest")
        slow = self.having("b", 0.5, "qwen3:8b", "llama3.2:latest")
        other = self.having("c", 0.1, "qwen3:8b")
        self.assertEqual(self.pool.candidates("fastest", "qwen3:8b"), [other, slow])
        self.assertEqual(self.pool.candidates("fastest", "llama3.2:latest"), [fast, slow])

    def test_a_name_without_tag_means_latest(self) -> None:
        self.having("a", 0.01, "llama3.2:1b")
        latest = self.having("b", 0.5, "llama3.2:latest")
        self.assertEqual(self.pool.candidates("fastest", "llama3.2"), [latest])

    def test_a_tagged_name_is_not_the_latest(self) -> None:
        small = self.having("a", 0.5, "llama3.2:1b")
        self.having("b", 0.01, "llama3.2")
        self.assertEqual(self.pool.candidates("fastest", "llama3.2:1b"), [small])

    def test_case_does_not_matter(self) -> None:
        self.having("a", 0.01, "qwen3:8b")
        peer = self.having("b", 0.5, "Llama3.2")
        self.assertEqual(self.pool.candidates("fastest", "LLAMA3.2:Latest"), [peer])

    def test_when_no_one_has_it_the_normal_choice(self) -> None:
        slow = self.having("a", 0.5, "qwen3:8b")
        fast = self.having("b", 0.01)
        self.assertEqual(self.pool.candidates("fastest", "gemma3:1b"), [fast, slow])
        self.assertEqual(self.pool.candidates("fastest", None), [fast, slow])

    def test_an_unhealthy_server_with_the_model_is_not_chosen(self) -> None:
        having = self.having("a", 0.01, "qwen3:8b")
        lacking = self.having("b", 0.5)
        self.down(having)
        self.assertEqual(self.pool.candidates("fastest", "qwen3:8b"), [lacking])

    def test_the_strategy_orders_those_having_it(self) -> None:
        a = self.having("a", 0.3, "qwen3:8b")
        self.having("b", 0.01)
        c = self.having("c", 0.1, "qwen3:8b")
        a.active = 0
        c.active = 2
        self.assertEqual(self.pool.candidates("fastest", "qwen3:8b"), [c, a])
        self.assertEqual(self.pool.candidates("least-connections", "qwen3:8b"), [a, c])
        rotations = [self.pool.candidates("round-robin", "qwen3:8b") for _ in range(2)]
        self.assertEqual(rotations, [[a, c], [c, a]])


class BeliefTests(SynchronousTestCase):
    """What a client takes in from the network: servers are not moved or multiplied at will."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.pool = PeerPool(self.clock, ttl=15)

    def test_a_healthy_server_is_not_moved_by_an_announcement_from_elsewhere(self) -> None:
        peer = self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.2")
        self.pool.check_succeeded(peer, 0.01)
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.66")
        self.assertEqual(peer.host, "198.18.0.2")
        self.pool.suspect(peer, "connection refused")  # no longer answers there: it moved
        self.pool.announced(wire.Announce(A, 11435, "http", "0.1.0"), "198.18.0.66")
        self.assertEqual(peer.host, "198.18.0.66")

    def test_sources_and_numbers_believed(self) -> None:
        self.pool = PeerPool(self.clock, ttl=15, admits=lambda host: host.startswith("198.18."))
        self.assertTrue(self.pool.believes("198.18.0.2", A.hex(), 11435))
        self.assertFalse(self.pool.believes("8.8.8.8", A.hex(), 11435))
        for n in range(MAX_PEERS):
            host, port = f"198.18.1.{n // MAX_PEERS_PER_HOST}", 11435 + n % MAX_PEERS_PER_HOST
            peer = self.pool.announced(wire.Announce(n.to_bytes(16, "big"), port, "http", ""), host)
            self.pool.check_succeeded(peer, 0.01)
        self.assertFalse(self.pool.believes("198.18.0.2", B.hex(), 11435), "full: nothing new")
        self.assertTrue(self.pool.believes("198.18.1.0", (5).to_bytes(16, "big").hex(), 11440))


def node(n: int) -> bytes:
    return n.to_bytes(16, "big")


class HardeningTestCase(SynchronousTestCase):
    """Announcements taken in as the discovery listener does: believes, then announced."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = PeerPool(self.clock, ttl=15)
        self.events = capture_logs(self)

    def announce(self, n: int, host: str = "198.18.0.66", port: int = 11435) -> Peer | None:
        if not self.pool.believes(host, node(n).hex(), port):
            return None
        return self.pool.announced(wire.Announce(node(n), port, "http", "0.1.0"), host)

    def keys(self) -> set[str]:
        return {peer.key for peer in self.pool}

    def logged(self, level: LogLevel) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_level") == level]


class OneServerPerAddressTests(HardeningTestCase):
    def test_a_new_id_waits_for_the_first_check_of_the_one_there(self) -> None:
        first = self.announce(1)
        assert first is not None
        self.assertIsNone(self.announce(2), "its first check has not ended yet")
        self.pool.check_failed(first, "connection refused")
        second = self.announce(2)
        assert second is not None
        self.assertEqual(self.keys(), {node(2).hex()})
        self.assertEqual((second.host, second.port), ("198.18.0.66", 11435))
        self.assertIsNone(self.pool.get(node(1).hex()))

    def test_a_server_that_answers_is_never_displaced(self) -> None:
        real = self.announce(1, "198.18.0.2")
        assert real is not None
        self.pool.check_succeeded(real, 0.01)
        for n in range(2, 302):
            self.clock.advance(0.1)
            if n % 50 == 0:
                self.pool.check_succeeded(real, 0.01)  # checked every 5 s, and answering
            self.assertIsNone(self.announce(n, "198.18.0.2"))
        self.assertEqual(list(self.pool), [real])
        self.pool.check_failed(real, "connection refused")
        self.assertIsNone(self.announce(400, "198.18.0.2"), "one failed check: still healthy")
        self.pool.check_failed(real, "connection refused")
        self.assertIsNotNone(self.announce(400, "198.18.0.2"), "down now: it gives way")
        self.assertEqual(self.keys(), {node(400).hex()})

    def test_a_server_whose_checks_passed_long_ago_gives_way(self) -> None:
        old = self.announce(1)
        assert old is not None
        self.pool.check_succeeded(old, 0.01)
        self.clock.advance(self.pool.ttl + 1)
        self.assertIsNotNone(self.announce(2))
        self.assertEqual(self.keys(), {node(2).hex()})

    def test_a_server_does_not_move_onto_one_that_answers(self) -> None:
        there = self.announce(1, "198.18.0.2")
        moving = self.announce(2, "198.18.0.3")
        assert there is not None and moving is not None
        self.pool.check_succeeded(there, 0.01)
        self.pool.suspect(moving, "connection refused")
        self.assertIsNone(self.announce(2, "198.18.0.2"))
        self.assertEqual((moving.host, there.host), ("198.18.0.3", "198.18.0.2"))

    def test_static_servers_are_apart(self) -> None:
        static = self.pool.add_static("198.18.0.66", 11435)
        self.assertIsNotNone(self.announce(1))
        self.assertIn(static, list(self.pool))
        self.assertEqual(len(self.pool), 2)

    def test_a_legacy_server_gives_way_at_once(self) -> None:
        self.assertTrue(self.pool.believes("198.18.0.9", "legacy:198.18.0.9", 11435))
        self.pool.legacy_replied("198.18.0.9")
        self.assertIsNotNone(self.announce(1, "198.18.0.9", 11435))
        self.assertEqual(self.keys(), {node(1).hex()})


class ServersPerHostTests(HardeningTestCase):
    def test_one_host_cannot_fill_the_pool(self) -> None:
        for n in range(300):  # the run of issue 12: fake ids from one address
            self.announce(n, "198.18.0.66", 20000 + n)
        self.assertEqual(len(self.pool), MAX_PEERS_PER_HOST)
        real = self.announce(1000, "198.18.0.2")
        self.assertIsNotNone(real, "a restarted server elsewhere is taken in at once")

    def test_the_oldest_one_that_does_not_answer_gives_way(self) -> None:
        peers = [self.announce(n, port=20000 + n) for n in range(MAX_PEERS_PER_HOST)]
        self.assertIsNone(self.announce(99, port=30000), "all waiting for their first check")
        for peer in peers[:3]:
            assert peer is not None
            self.pool.check_succeeded(peer, 0.01)
        for peer in peers[3:6]:
            assert peer is not None
            self.pool.check_failed(peer, "connection refused")
        self.assertIsNotNone(self.announce(99, port=30000))
        self.assertNotIn(node(3).hex(), self.keys())
        self.assertEqual(len(self.pool), MAX_PEERS_PER_HOST)
        self.assertTrue({node(n).hex() for n in (0, 1, 2, 4, 5)} <= self.keys())


class FullPoolTests(HardeningTestCase):
    def fill(self) -> list[Peer]:
        peers = []
        for n in range(MAX_PEERS):
            host = f"198.18.1.{n // MAX_PEERS_PER_HOST}"
            peer = self.announce(n, host, 20000 + n % MAX_PEERS_PER_HOST)
            assert peer is not None
            peers.append(peer)
        self.assertEqual(len(self.pool), MAX_PEERS)
        return peers

    def test_the_oldest_never_checked_ok_gives_way(self) -> None:
        peers = self.fill()
        self.assertIsNone(self.announce(999, "198.18.0.2"), "none has had a check yet")
        for peer in peers[:2]:
            self.pool.check_succeeded(peer, 0.01)
            self.down(peer)
        for peer in peers[2:4]:
            self.pool.check_failed(peer, "connection refused")
        self.assertIsNotNone(self.announce(999, "198.18.0.2"))
        self.assertEqual(len(self.pool), MAX_PEERS)
        self.assertNotIn(peers[2].key, self.keys())
        self.assertTrue({peers[0].key, peers[1].key, peers[3].key} <= self.keys())

    def test_never_one_that_passed_a_check(self) -> None:
        for peer in self.fill():
            self.pool.check_succeeded(peer, 0.01)
            self.down(peer)
        self.assertIsNone(self.announce(999, "198.18.0.2"))
        self.assertEqual(len(self.pool), MAX_PEERS)

    def down(self, peer: Peer) -> None:
        for _ in range(self.pool.unhealthy_after):
            self.pool.check_failed(peer, "connection refused")


class FoundLinesTests(HardeningTestCase):
    def test_a_few_found_lines_a_minute_then_a_count(self) -> None:
        for n in range(20):
            self.announce(n, f"198.18.0.{n + 10}")
        found = "Found server {node} at {url} (Ollana {version})"
        self.assertEqual(self.logged(LogLevel.info), [found] * 8)
        self.assertEqual(self.logged(LogLevel.debug), [found] * 12)
        self.clock.advance(60)
        self.announce(0, "198.18.0.10")  # any announcement after the minute tells the count
        [count] = [e for e in self.events if e.get("count") is not None]
        self.assertEqual((count["log_level"], count["count"]), (LogLevel.info, 12))
        self.announce(100, "198.18.0.100")
        self.assertEqual(self.logged(LogLevel.info)[-1], found, "a new minute, a new quota")
