"""Discovery protocols on fake datagram transports, and their services on a fake reactor."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterable

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollana import wire
from ollana.auth import PacketAuth
from ollana.config import Settings
from ollana.discovery import AnnouncementListener, ProbeResponder, ReplyLimiter, Seeker
from ollana.node import HTTPListener, ResponderService, SeekerService
from ollana.peers import FOUND_LINES, MAX_PEERS_PER_HOST, PeerPool, Source
from tests.support.fakes import FakeDatagramPort, FakeNetworkReactor, capture_logs

ME = b"\x11" * 16
OTHER = b"\x22" * 16
CLIENT = ("198.18.0.50", 40001)
SERVER = ("198.18.0.2", 11436)
TARGETS = [("198.18.0.255", 11436), ("127.255.255.255", 11436)]


class LogCapture:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events = capture_logs(case)

    def at(self, level: LogLevel) -> list[dict]:
        return [e for e in self.events if e.get("log_level") == level]


class ProbeResponderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.serving = True
        self.clock = Clock()
        self.responder = ProbeResponder(
            ME, lambda: TARGETS, "http", "0.1.0", lambda: self.serving, clock=self.clock
        )
        self.responder.proxy_port = 11435
        self.port = FakeDatagramPort(self.responder, 11436)
        self.announce = wire.encode(wire.Announce(ME, 11435, "http", "0.1.0"))

    def test_answers_a_probe_by_unicast(self) -> None:
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.assertEqual(self.port.take(), [(self.announce, CLIENT)])

    def test_answers_a_legacy_probe_with_the_bare_magic(self) -> None:
        self.responder.datagramReceived(b"LANA", CLIENT)
        self.assertEqual(self.port.take(), [(b"LANA", CLIENT)])

    def test_no_answer_to_an_original_servers_reply(self) -> None:
        # The original server answers any datagram, our announcements too, from the
        # discovery port; answering back would never end.
        self.responder.announce()
        self.port.take()
        self.responder.datagramReceived(b"LANA", ("198.18.0.9", 11436))
        self.assertEqual(self.port.take(), [])

    def test_silent_while_not_serving(self) -> None:
        self.serving = False
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.responder.datagramReceived(b"LANA", CLIENT)
        self.responder.announce()
        self.assertEqual(self.port.take(), [])

    def test_silent_until_the_proxy_port_is_known(self) -> None:
        self.responder.proxy_port = None
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.assertEqual(self.port.take(), [])

    def test_ignores_its_own_probe_and_other_messages(self) -> None:
        self.responder.datagramReceived(wire.encode(wire.Probe(ME)), CLIENT)
        self.responder.datagramReceived(wire.encode(wire.Announce(OTHER, 1, "http", "x")), CLIENT)
        self.responder.datagramReceived(wire.encode(wire.Bye(OTHER)), CLIENT)
        self.assertEqual(self.port.take(), [])
        self.assertEqual(self.responder.received, 2)

    def test_malformed_datagrams_are_counted_and_ignored(self) -> None:
        for junk in (b"", b"LAN", b"GET / HTTP/1.1\r\n", b"LANA\x07" + bytes(30)):
            self.responder.datagramReceived(junk, CLIENT)
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.assertEqual(self.responder.rejected, 4)
        self.assertEqual(self.port.take(), [(self.announce, CLIENT)])

    def test_announce_and_bye_go_to_every_target(self) -> None:
        self.responder.announce()
        self.responder.bye()
        bye = wire.encode(wire.Bye(ME))
        self.assertEqual(
            self.port.take(),
            [
                (self.announce, TARGETS[0]),
                (self.announce, TARGETS[1]),
                (bye, TARGETS[0]),
                (bye, TARGETS[1]),
            ],
        )

    def test_send_errors_are_logged_and_survived(self) -> None:
        logs = LogCapture(self)
        self.port.write_error = OSError(errno.ENETUNREACH, "Network is unreachable")
        self.responder.announce()
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        [warning] = logs.at(LogLevel.warn)  # the first at once, the others counted
        self.assertEqual(warning["error"], "Network is unreachable")
        self.clock.advance(60)
        [_, repeats] = logs.at(LogLevel.warn)
        self.assertEqual((repeats["repeated"], repeats["host"]), (2, CLIENT[0]))
        self.port.write_error = None
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.assertEqual(self.port.take(), [(self.announce, CLIENT)])

    def test_handler_errors_are_logged_not_raised(self) -> None:
        logs = LogCapture(self)

        def broken() -> bool:
            raise RuntimeError("boom")

        self.responder.is_serving = broken
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(logs.at(LogLevel.critical)), 1)


class SeekerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = PeerPool(self.clock, ttl=15)
        self.seeker = Seeker(ME, self.pool, lambda: TARGETS, clock=self.clock)
        self.own = FakeDatagramPort(self.seeker, 40001)
        self.listener = AnnouncementListener(ME, self.pool, clock=self.clock)
        self.shared = FakeDatagramPort(self.listener, 11436)

    def test_probe_goes_to_every_target(self) -> None:
        self.seeker.probe()
        probe = wire.encode(wire.Probe(ME))
        self.assertEqual(self.own.take(), [(probe, TARGETS[0]), (probe, TARGETS[1])])

    def test_reply_adds_a_peer_at_the_source_address(self) -> None:
        self.seeker.datagramReceived(
            wire.encode(wire.Announce(OTHER, 11435, "http", "0.1.0")), SERVER
        )
        [peer] = self.pool
        self.assertEqual((peer.host, peer.port, peer.key), ("198.18.0.2", 11435, OTHER.hex()))

    def test_unsolicited_announce_and_bye_on_the_shared_port(self) -> None:
        self.listener.datagramReceived(
            wire.encode(wire.Announce(OTHER, 11435, "http", "0.1.0")), SERVER
        )
        self.assertEqual(len(self.pool), 1)
        self.listener.datagramReceived(wire.encode(wire.Bye(OTHER)), SERVER)
        self.assertEqual(len(self.pool), 0)

    def test_own_announcements_are_ignored(self) -> None:
        self.listener.datagramReceived(
            wire.encode(wire.Announce(ME, 11435, "http", "0.1.0")), SERVER
        )
        self.seeker.datagramReceived(wire.encode(wire.Announce(ME, 11435, "http", "0.1.0")), SERVER)
        self.assertEqual(len(self.pool), 0)

    def test_bare_reply_on_own_socket_is_a_legacy_server(self) -> None:
        self.seeker.datagramReceived(b"LANA", ("198.18.0.9", 11436))
        [peer] = self.pool
        self.assertIs(peer.source, Source.LEGACY)
        self.assertEqual(peer.url, "http://198.18.0.9:11435")

    def test_bare_magic_on_the_shared_port_is_another_clients_probe(self) -> None:
        self.listener.datagramReceived(b"LANA", ("198.18.0.9", 50000))
        self.listener.datagramReceived(wire.encode(wire.Probe(OTHER)), ("198.18.0.9", 50000))
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.shared.take(), [])

    def test_probe_send_errors_are_survived(self) -> None:
        self.own.write_error = OSError(errno.ENETUNREACH, "Network is unreachable")
        self.seeker.probe()
        self.assertEqual(self.seeker.sent, 0)
        self.own.write_error = None
        self.seeker.probe()
        self.assertEqual(self.seeker.sent, 2)


def settings(**kw: object) -> Settings:
    base: dict = dict(
        broadcast=("127.255.255.255",), discovery_port=11436, node_id=ME, probe_interval=5.0
    )
    base.update(kw)
    return Settings(**base)


class SeekerServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeNetworkReactor()
        self.pool = PeerPool(self.reactor, ttl=15)
        self.errors: list[str] = []
        self.targets = [("127.255.255.255", 11436)]
        self.service = SeekerService(
            self.reactor, self.pool, settings(), lambda: self.targets, self.errors.append
        )

    def test_probes_at_start_and_every_interval(self) -> None:
        self.service.startService()
        shared, own = self.reactor.udp_ports
        self.assertEqual((shared.port, own.port != 11436), (11436, True))
        self.assertTrue(own.broadcast_allowed)
        probe = wire.encode(wire.Probe(ME))
        self.assertEqual(own.take(), [(probe, ("127.255.255.255", 11436))])
        self.reactor.advance(4.9)
        self.assertEqual(own.take(), [])
        self.reactor.advance(0.1)
        self.assertEqual(own.take(), [(probe, ("127.255.255.255", 11436))])
        self.reactor.advance(5)
        self.assertEqual(len(own.take()), 1)

    def test_broadcast_targets_are_looked_up_at_each_probe(self) -> None:
        self.service.startService()
        own = self.reactor.udp_ports[1]
        self.targets = [("198.18.0.255", 11436), ("198.18.4.255", 11436)]
        own.take()
        self.reactor.advance(5)
        self.assertEqual([target for _, target in own.take()], self.targets)

    def test_own_socket_failure_is_reported(self) -> None:
        def refuse(
            port: int, protocol: object, interface: str = "", maxPacketSize: int = 8192
        ) -> None:
            raise error.CannotListenError("", 0, OSError(errno.EMFILE, "Too many open files"))

        self.reactor.listenUDP = refuse  # type: ignore[assignment,method-assign]
        self.service.startService()
        self.assertEqual(
            self.errors,
            ["Cannot open a UDP socket for discovery probes: [Errno 24] Too many open files"],
        )

    def test_peers_expire_after_three_silent_intervals(self) -> None:
        self.service.startService()
        shared, own = self.reactor.udp_ports
        own.protocol.datagramReceived(wire.encode(wire.Announce(OTHER, 11435, "http", "1")), SERVER)
        self.reactor.advance(15)
        self.assertEqual(len(self.pool), 1)
        self.reactor.advance(5)
        self.assertEqual(len(self.pool), 0)

    def test_loop_survives_errors(self) -> None:
        self.service.startService()
        calls = []

        def broken() -> list:
            calls.append(1)
            raise RuntimeError("boom")

        self.pool.expire = broken  # type: ignore[method-assign]
        self.reactor.advance(5)
        self.reactor.advance(5)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stop_closes_sockets_and_stops_probing(self) -> None:
        self.service.startService()
        self.successResultOf(defer.maybeDeferred(self.service.stopService))
        shared, own = self.reactor.udp_ports
        self.assertFalse(shared.listening or own.listening)
        own.take()
        self.reactor.advance(30)
        self.assertEqual(own.take(), [])

    def test_discovery_port_in_use_is_reported_in_one_line(self) -> None:
        self.reactor.busy_udp_ports.add(11436)
        self.service.startService()
        self.assertEqual(
            self.errors,
            [
                "Cannot listen on UDP port 11436: Address already in use. "
                "Choose another with --discovery-port."
            ],
        )


class ResponderServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeNetworkReactor()
        self.serving = True
        self.errors: list[str] = []
        self.listener = HTTPListener(
            self.reactor,
            "tcp:11435:interface=127.0.0.1",
            Site(Resource()),
            self.errors.append,
        )
        self.responder = ProbeResponder(
            ME, lambda: [("127.255.255.255", 11436)], "http", "0.1.0", lambda: self.serving,
            clock=self.reactor,
        )  # fmt: skip
        self.service = ResponderService(
            self.reactor, self.responder, settings(), self.listener, self.errors.append
        )
        self.parent = MultiService()
        self.listener.setServiceParent(self.parent)
        self.service.setServiceParent(self.parent)

    def test_announces_once_listening_and_says_bye_on_stop(self) -> None:
        self.parent.startService()
        [udp] = self.reactor.udp_ports
        self.assertEqual((udp.port, udp.broadcast_allowed), (11436, True))
        self.assertEqual(
            udp.take(),
            [(wire.encode(wire.Announce(ME, 11435, "http", "0.1.0")), ("127.255.255.255", 11436))],
        )
        self.successResultOf(defer.maybeDeferred(self.parent.stopService))
        self.assertEqual(udp.take(), [(wire.encode(wire.Bye(ME)), ("127.255.255.255", 11436))])
        self.assertFalse(udp.listening)

    def test_tcp_port_in_use_is_reported_in_one_line(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        class Busy(MemoryReactorClock):
            def listenTCP(
                self, port: int, factory: object, backlog: int = 50, interface: str = ""
            ) -> object:
                from twisted.internet.error import CannotListenError

                raise CannotListenError(
                    interface, port, OSError(errno.EADDRINUSE, "Address already in use")
                )

        listener = HTTPListener(
            Busy(), "tcp:11435:interface=127.0.0.1", Site(Resource()), self.errors.append
        )
        listener.startService()
        self.assertEqual(
            self.errors,
            [
                "Cannot listen on TCP port 11435 on 127.0.0.1: Address already in use. "
                "Choose another with --listen."
            ],
        )
        self.assertNoResult(listener.whenListening())

    def test_an_endpoint_that_cannot_be_made_is_reported_in_one_line(self) -> None:
        """What the --listen check does not read (an ssl: endpoint's certificate, say)."""
        key = self.mktemp()
        with open(key, "wb") as f:
            f.write(b"not a certificate")
        listener = HTTPListener(
            self.reactor, f"ssl:11435:privateKey={key}", Site(Resource()), self.errors.append
        )
        listener.startService()
        [error] = self.errors
        self.assertTrue(error.startswith(f"Cannot listen on ssl:11435:privateKey={key}: "), error)
        self.assertNotIn("\n", error)
        self.assertEqual(self.reactor.sslServers, [])
        self.assertNoResult(listener.whenListening())


SECRET = b"a shared secret of the whole LAN"
WRONG_SECRET = b"a secret of some other LAN, long"
START = 1_700_000_000.0
FINGERPRINT = bytes(range(32))


def wall_clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


class AuthResponderTests(SynchronousTestCase):
    """A server with a secret: signed replies to signed probes, silence for the rest."""

    def setUp(self) -> None:
        self.clock = wall_clock()
        self.auth = PacketAuth(SECRET, self.clock)
        self.responder = ProbeResponder(
            ME,
            lambda: TARGETS,
            "https",
            "0.1.0",
            lambda: True,
            auth=self.auth,
            fingerprint=FINGERPRINT,
            clock=self.clock,
        )
        self.responder.proxy_port = 11435
        self.port = FakeDatagramPort(self.responder, 11436)
        self.client_clock = wall_clock()
        self.client = PacketAuth(SECRET, self.client_clock)

    def signed_probe(self, node: bytes = OTHER) -> bytes:
        return self.client.sign(wire.encode(wire.Probe(node)))

    def test_signed_reply_to_a_signed_probe(self) -> None:
        self.responder.datagramReceived(self.signed_probe(), CLIENT)
        [(reply, to)] = self.port.take()
        self.assertEqual(to, CLIENT)
        self.assertEqual(
            wire.decode(self.client.verify(reply)),
            wire.Announce(ME, 11435, "https", "0.1.0", FINGERPRINT),
        )
        self.assertEqual((self.responder.received, self.responder.rejected), (1, 0))

    def test_announce_and_bye_are_signed(self) -> None:
        self.responder.announce()
        self.responder.bye()
        sent = [self.client.verify(data) for data, _ in self.port.take()]
        self.assertEqual(
            [wire.decode(packet) for packet in sent],
            [wire.Announce(ME, 11435, "https", "0.1.0", FINGERPRINT)] * 2 + [wire.Bye(ME)] * 2,
        )

    def test_own_signed_broadcast_is_ignored_quietly(self) -> None:
        self.responder.announce()
        for data, _ in self.port.take():
            self.responder.datagramReceived(data, ("198.18.0.2", 11436))
        self.assertEqual(self.port.take(), [])
        self.assertEqual((self.responder.received, self.responder.rejected), (0, 0))

    def assertIgnored(self, datagram: bytes, addr: tuple[str, int] = CLIENT) -> None:
        rejected = self.responder.rejected
        self.responder.datagramReceived(datagram, addr)
        self.assertEqual(self.port.take(), [])
        self.assertEqual(self.responder.rejected, rejected + 1)

    def test_unsigned_probe_is_ignored(self) -> None:
        self.assertIgnored(wire.encode(wire.Probe(OTHER)))

    def test_legacy_probe_is_ignored(self) -> None:
        self.assertIgnored(b"LANA")
        self.assertIgnored(b"LANA", ("198.18.0.9", 11436))

    def test_wrong_secret_is_ignored(self) -> None:
        other = PacketAuth(WRONG_SECRET, self.client_clock)
        self.assertIgnored(other.sign(wire.encode(wire.Probe(OTHER))))

    def test_replayed_probe_is_ignored(self) -> None:
        probe = self.signed_probe()
        self.responder.datagramReceived(probe, CLIENT)
        self.assertEqual(len(self.port.take()), 1)
        self.assertIgnored(probe)
        self.assertIgnored(probe, ("198.18.0.99", 40001))

    def test_stale_and_future_probes_are_ignored(self) -> None:
        probe = self.signed_probe()
        self.clock.advance(31)
        self.assertIgnored(probe)
        self.client_clock.advance(62)
        self.assertIgnored(self.signed_probe())
        self.client_clock.advance(-31)
        self.responder.datagramReceived(self.signed_probe(), CLIENT)
        self.assertEqual(len(self.port.take()), 1)

    def test_rejections_are_logged_at_debug_without_secrets(self) -> None:
        logs = LogCapture(self)
        self.assertIgnored(
            PacketAuth(WRONG_SECRET, self.client_clock).sign(wire.encode(wire.Probe(OTHER)))
        )
        self.assertIgnored(b"LANA")
        self.assertEqual([e for e in logs.events if e["log_level"] != LogLevel.debug], [])
        text = "\n".join(formatEvent(e) for e in logs.events)
        self.assertIn("bad authentication tag", text)
        for secret in (SECRET, WRONG_SECRET):
            self.assertNotIn(secret.decode(), text)
            self.assertNotIn(secret.hex(), text)

    def test_burst_of_junk(self) -> None:
        """10,000 random, truncated, flipped, replayed, forged and unsigned datagrams:
        no exception, no reply, all counted; a real probe is still answered after."""
        rng = random.Random(6)
        probe = self.signed_probe()
        self.responder.datagramReceived(probe, CLIENT)
        self.assertEqual(len(self.port.take()), 1)
        forger = PacketAuth(WRONG_SECRET, self.client_clock)
        makers = [
            lambda: rng.randbytes(rng.randrange(0, 600)),
            lambda: probe[: rng.randrange(0, len(probe))],
            lambda: flip(probe, rng.randrange(len(probe) * 8)),
            lambda: probe,
            lambda: probe + rng.randbytes(rng.randrange(1, 40)),
            lambda: forger.sign(wire.encode(wire.Probe(rng.randbytes(16)))),
            lambda: wire.encode(wire.Probe(rng.randbytes(16))),
            lambda: b"LANA",
            lambda: probe[:22] + rng.randbytes(rng.randrange(0, 100)),
            lambda: probe[:-32] + rng.randbytes(32),
        ]
        received = self.responder.received
        for i in range(10_000):
            datagram = makers[i % len(makers)]()
            source = (f"198.18.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(65536))
            self.responder.datagramReceived(datagram, source)
        self.assertEqual(self.port.take(), [])
        self.assertEqual(self.responder.rejected, 10_000)
        self.assertEqual(self.responder.received, received)
        self.assertEqual(self.auth.remembered, 1)
        self.assertEqual(sum(self.auth.rejections.values()), 10_000)
        self.responder.datagramReceived(self.signed_probe(), CLIENT)
        [(reply, to)] = self.port.take()
        self.assertEqual(to, CLIENT)
        self.assertIsInstance(wire.decode(self.client.verify(reply)), wire.Announce)

    @hypothesis_settings(max_examples=300)
    @given(st.binary(max_size=600))
    def test_any_datagram_is_survived_silently(self, datagram: bytes) -> None:
        self.responder.datagramReceived(datagram, CLIENT)
        self.assertEqual(self.port.take(), [])


def flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


class AllowListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.asked: list[str] = []

        def allowed(host: str) -> bool:
            self.asked.append(host)
            return host.startswith("198.18.0.")

        self.responder = ProbeResponder(
            ME, lambda: TARGETS, "http", "0.1.0", lambda: True, allowed=allowed, clock=Clock()
        )
        self.responder.proxy_port = 11435
        self.port = FakeDatagramPort(self.responder, 11436)

    def test_only_allowed_hosts_are_answered(self) -> None:
        probe = wire.encode(wire.Probe(OTHER))
        self.responder.datagramReceived(probe, ("203.0.113.7", 40001))
        self.responder.datagramReceived(b"LANA", ("203.0.113.7", 40002))
        self.assertEqual(self.port.take(), [])
        self.assertEqual(self.responder.refused, 2)
        self.responder.datagramReceived(probe, CLIENT)
        self.responder.datagramReceived(b"LANA", CLIENT)
        self.assertEqual([to for _, to in self.port.take()], [CLIENT, CLIENT])
        self.assertEqual(self.asked, ["203.0.113.7"] * 2 + ["198.18.0.50"] * 2)

    def test_broadcasts_are_not_filtered(self) -> None:
        self.responder.announce()
        self.assertEqual(len(self.port.take()), 2)
        self.assertEqual(self.asked, [])

    def test_a_failing_predicate_is_logged_not_raised(self) -> None:
        def broken(host: str) -> bool:
            raise RuntimeError("boom")

        self.responder.allowed = broken
        self.responder.datagramReceived(wire.encode(wire.Probe(OTHER)), CLIENT)
        self.assertEqual(self.port.take(), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RateLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.responder = ProbeResponder(
            ME,
            lambda: TARGETS,
            "http",
            "0.1.0",
            lambda: True,
            clock=self.clock,
            reply_rate=4,
            reply_burst=8,
        )
        self.responder.proxy_port = 11435
        self.port = FakeDatagramPort(self.responder, 11436)
        self.probe = wire.encode(wire.Probe(OTHER))

    def replies(self, count: int, host: str = "198.18.0.50", legacy: bool = False) -> int:
        for port in range(count):
            self.responder.datagramReceived(b"LANA" if legacy else self.probe, (host, 40000 + port))
        return len(self.port.take())

    def test_burst_then_rate_per_host(self) -> None:
        self.assertEqual(self.replies(20), 8)
        self.assertEqual(self.responder.limited, 12)
        self.assertEqual(self.replies(3, "198.18.0.51"), 3)  # another host has its own
        self.clock.advance(0.25)
        self.assertEqual(self.replies(5), 1)
        self.clock.advance(1)
        self.assertEqual(self.replies(5), 4)
        self.clock.advance(60)
        self.assertEqual(self.replies(20), 8)

    def test_legacy_probes_count_too(self) -> None:
        self.assertEqual(self.replies(5) + self.replies(10, legacy=True), 8)

    def test_steady_probing_is_never_limited(self) -> None:
        # A client probing every half second (ollana discover) plus one every 5 s.
        for _ in range(100):
            self.assertEqual(self.replies(1), 1)
            self.clock.advance(0.5)
            self.assertEqual(self.replies(1), 1)
            self.clock.advance(0.5)
        self.assertEqual(self.responder.limited, 0)

    def test_no_tokens_spent_while_silent(self) -> None:
        self.responder.proxy_port = None
        self.assertEqual(self.replies(20), 0)
        self.responder.proxy_port = 11435
        self.assertEqual(self.replies(20), 8)

    def test_limiter_tracks_a_bounded_number_of_hosts(self) -> None:
        clock = Clock()
        limiter = ReplyLimiter(clock.seconds, rate=4, burst=2, max_hosts=100)
        for i in range(100):
            self.assertTrue(limiter.allow(f"10.0.0.{i}"))
        self.assertFalse(limiter.allow("10.0.1.1"))  # full, nobody refilled yet
        self.assertEqual(len(limiter), 100)
        clock.advance(0.1)
        limiter.allow("10.0.0.0")  # one refilled bucket is not room while the others are not
        clock.advance(1)
        self.assertTrue(limiter.allow("10.0.1.1"))  # all refilled: forgotten
        self.assertLessEqual(len(limiter), 100)
        for i in range(10_000):
            limiter.allow(f"10.1.{i // 256}.{i % 256}")
            self.assertLessEqual(len(limiter), 100)

    def test_limiter_refuses_bad_settings(self) -> None:
        self.assertRaises(ValueError, ReplyLimiter, Clock().seconds, 0, 1)
        self.assertRaises(ValueError, ReplyLimiter, Clock().seconds, 1, 0)


class FingerprintTests(SynchronousTestCase):
    def test_announce_carries_the_fingerprint_without_auth(self) -> None:
        responder = ProbeResponder(
            ME,
            lambda: TARGETS[:1],
            "https",
            "0.1.0",
            lambda: True,
            fingerprint=FINGERPRINT,
            clock=Clock(),
        )
        responder.proxy_port = 11435
        port = FakeDatagramPort(responder, 11436)
        responder.announce()
        [(data, _)] = port.take()
        self.assertEqual(wire.decode(data).fingerprint, FINGERPRINT)  # type: ignore[union-attr]

    def test_bad_fingerprint_refused(self) -> None:
        self.assertRaises(
            ValueError,
            ProbeResponder,
            ME,
            lambda: [],
            "https",
            "1",
            lambda: True,
            fingerprint=b"short",
            clock=Clock(),
        )


class AuthSeekerTests(SynchronousTestCase):
    """A client with a secret: believes only signed announcements and byes."""

    def setUp(self) -> None:
        self.clock = wall_clock()
        self.pool = PeerPool(self.clock, ttl=15)
        auth = PacketAuth(SECRET, self.clock)
        self.seeker = Seeker(ME, self.pool, lambda: TARGETS, clock=self.clock, auth=auth)
        self.own = FakeDatagramPort(self.seeker, 40001)
        self.listener = AnnouncementListener(ME, self.pool, clock=self.clock, auth=auth)
        self.shared = FakeDatagramPort(self.listener, 11436)
        self.server = PacketAuth(SECRET, wall_clock())

    def announce(self, fingerprint: bytes | None = FINGERPRINT) -> bytes:
        return self.server.sign(wire.encode(wire.Announce(OTHER, 11435, "https", "1", fingerprint)))

    def test_probes_are_signed(self) -> None:
        self.seeker.probe()
        sent = self.own.take()
        self.assertEqual(len(sent), 2)
        for data, _ in sent:
            self.assertEqual(wire.decode(self.server.verify(data)), wire.Probe(ME))

    def test_signed_reply_records_the_fingerprint(self) -> None:
        self.seeker.datagramReceived(self.announce(), SERVER)
        [peer] = self.pool
        self.assertEqual((peer.url, peer.fingerprint), ("https://198.18.0.2:11435", FINGERPRINT))
        self.listener.datagramReceived(self.announce(b"\x07" * 32), SERVER)
        self.assertEqual(peer.fingerprint, b"\x07" * 32)
        self.listener.datagramReceived(self.announce(None), SERVER)
        self.assertIsNone(peer.fingerprint)

    def test_unsigned_announce_and_bye_are_ignored(self) -> None:
        self.listener.datagramReceived(
            wire.encode(wire.Announce(OTHER, 11435, "http", "1")), SERVER
        )
        self.assertEqual(len(self.pool), 0)
        self.listener.datagramReceived(self.announce(), SERVER)
        # Nobody without the secret can make a client forget a server.
        self.listener.datagramReceived(wire.encode(wire.Bye(OTHER)), SERVER)
        self.assertEqual(len(self.pool), 1)
        self.assertEqual(self.listener.rejected, 2)
        self.listener.datagramReceived(self.server.sign(wire.encode(wire.Bye(OTHER))), SERVER)
        self.assertEqual(len(self.pool), 0)

    def test_replayed_announce_is_ignored(self) -> None:
        announce = self.announce()
        self.listener.datagramReceived(announce, SERVER)
        self.seeker.datagramReceived(announce, SERVER)
        self.assertEqual((self.listener.rejected, self.seeker.rejected), (0, 1))

    def test_legacy_reply_is_ignored(self) -> None:
        self.seeker.datagramReceived(b"LANA", ("198.18.0.9", 11436))
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.seeker.rejected, 1)

    def test_without_auth_signed_datagrams_are_read_as_plain(self) -> None:
        pool = PeerPool(self.clock, ttl=15)
        plain = Seeker(ME, pool, lambda: TARGETS, clock=self.clock)
        FakeDatagramPort(plain, 40002)
        plain.datagramReceived(self.announce(), SERVER)
        [peer] = pool
        self.assertEqual(peer.fingerprint, FINGERPRINT)


class AuthEndToEndTests(SynchronousTestCase):
    def test_client_finds_server_with_the_same_secret_only(self) -> None:
        server_clock, client_clock = wall_clock(), wall_clock()
        client_clock.advance(3)  # clocks need not agree to the second
        responder = ProbeResponder(
            OTHER,
            lambda: [],
            "https",
            "1",
            lambda: True,
            auth=PacketAuth(SECRET, server_clock),
            fingerprint=FINGERPRINT,
            clock=server_clock,
        )
        responder.proxy_port = 11435
        server_port = FakeDatagramPort(responder, 11436)
        found = []
        for secret in (SECRET, WRONG_SECRET):
            pool = PeerPool(client_clock, ttl=15)
            seeker = Seeker(ME, pool, lambda: [SERVER], clock=client_clock,
                            auth=PacketAuth(secret, client_clock))  # fmt: skip
            client_port = FakeDatagramPort(seeker, 40001)
            seeker.probe()
            for data, _ in client_port.take():
                responder.datagramReceived(data, CLIENT)
            for data, _ in server_port.take():
                seeker.datagramReceived(data, SERVER)
            found.append([(peer.url, peer.fingerprint) for peer in pool])
        self.assertEqual(found, [[("https://198.18.0.2:11435", FINGERPRINT)], []])
        self.assertEqual(responder.rejected, 1)


def loud(events: Iterable[dict]) -> list[dict]:
    """The events at info level or above: what a node's log shows by default."""
    return [e for e in events if e["log_level"] >= LogLevel.info]


class FloodTests(SynchronousTestCase):
    """10,000 datagrams that are ignored write a line a minute, not a line each."""

    def setUp(self) -> None:
        self.clock = wall_clock()
        self.rng = random.Random(12)
        self.logs = LogCapture(self)

    def source(self) -> tuple[str, int]:
        return f"198.18.0.{self.rng.randrange(3)}", self.rng.randrange(1024, 65536)

    def test_junk_unsigned_and_replayed_datagrams_with_a_secret(self) -> None:
        auth = PacketAuth(SECRET, self.clock)
        responder = ProbeResponder(ME, lambda: [], "http", "1", lambda: True, clock=self.clock,
                                   auth=auth)  # fmt: skip
        responder.proxy_port = 11435
        port = FakeDatagramPort(responder, 11436)
        client = PacketAuth(SECRET, self.clock)
        probe = client.sign(wire.encode(wire.Probe(OTHER)))
        forger = PacketAuth(WRONG_SECRET, self.clock)
        makers = [
            lambda: self.rng.randbytes(self.rng.randrange(0, 600)),
            lambda: wire.encode(wire.Probe(self.rng.randbytes(16))),
            lambda: forger.sign(wire.encode(wire.Probe(self.rng.randbytes(16)))),
            lambda: probe,
        ]
        for i in range(10_000):
            responder.datagramReceived(makers[i % len(makers)](), self.source())
        self.assertEqual(len(port.take()), 1, "the first probe, answered")
        self.assertEqual(loud(self.logs.events), [])
        self.clock.advance(59)
        self.assertEqual(loud(self.logs.events), [])
        self.clock.advance(1)
        [line] = loud(self.logs.events)
        self.assertEqual(line["count"], 9_999)
        self.assertRegex(
            formatEvent(line), "^Ignored 9,999 datagrams from 3 hosts in the last 60 s: "
        )
        for reason in ("2,500 unsigned", "2,500 forged", "2,499 replayed", "2,500 malformed"):
            self.assertIn(reason, line["reasons"])
        self.clock.advance(600)
        self.assertEqual(len(loud(self.logs.events)), 1, "nothing more to tell")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_junk_and_fake_servers_without_a_secret(self) -> None:
        pool = PeerPool(self.clock, ttl=15)
        seeker = Seeker(ME, pool, lambda: TARGETS, clock=self.clock)
        listener = AnnouncementListener(ME, pool, clock=self.clock)
        FakeDatagramPort(seeker, 40001)
        FakeDatagramPort(listener, 11436)
        makers = [
            lambda: self.rng.randbytes(self.rng.randrange(0, 600)),
            lambda: b"LANA" + self.rng.randbytes(self.rng.randrange(0, 40)),
            lambda: wire.encode(wire.Announce(self.rng.randbytes(16),
                                              self.rng.randrange(1, 65536), "http", "x")),
            lambda: wire.encode(wire.Bye(self.rng.randbytes(16))),
            lambda: wire.encode(wire.Probe(self.rng.randbytes(16))),
            lambda: b"LANA",
        ]  # fmt: skip
        for i in range(10_000):
            protocol = (listener, seeker)[i % 2]
            protocol.datagramReceived(makers[i % len(makers)](), ("198.18.0.66", 11436))
        self.assertEqual(len(pool), MAX_PEERS_PER_HOST, "from one host")
        self.clock.advance(60)
        lines = [formatEvent(e) for e in loud(self.logs.events)]
        found = [line for line in lines if line.startswith("Found server")]
        self.assertEqual(len(found), FOUND_LINES)
        legacy = [line for line in lines if line.startswith("Found legacy")]
        self.assertEqual(legacy, ["Found legacy Ollana server at http://198.18.0.66:11435"])
        ignored = [line for line in lines if line.startswith("Ignored")]
        self.assertEqual(len(ignored), 2, "one for each socket")
        self.assertEqual(len(lines), FOUND_LINES + 3, lines)
        self.assertIn("announcements not believed", ignored[0] + ignored[1])
        self.assertIn("malformed", ignored[0])

    def test_probes_left_unanswered(self) -> None:
        responder = ProbeResponder(ME, lambda: [], "http", "1", lambda: True, clock=self.clock,
                                   allowed=lambda host: host != "203.0.113.9")  # fmt: skip
        responder.proxy_port = 11435
        port = FakeDatagramPort(responder, 11436)
        probe = wire.encode(wire.Probe(OTHER))
        for _ in range(5_000):
            responder.datagramReceived(probe, ("203.0.113.9", 40000))
            responder.datagramReceived(probe, CLIENT)
        self.assertEqual(len(port.take()), responder.limiter.burst)
        self.clock.advance(60)
        [line] = loud(self.logs.events)
        self.assertEqual(
            formatEvent(line),
            "Ignored 9,992 datagrams from 2 hosts in the last 60 s: 5,000 from hosts not "
            "allowed, 4,992 over the reply rate",
        )

    def test_stopping_tells_what_was_counted(self) -> None:
        listener = AnnouncementListener(ME, PeerPool(self.clock, ttl=15), clock=self.clock)
        port = FakeDatagramPort(listener, 11436)
        listener.datagramReceived(b"junk", CLIENT)
        self.clock.advance(12)
        port.stopListening()
        [line] = loud(self.logs.events)
        self.assertEqual(
            formatEvent(line), "Ignored 1 datagram from 1 host in the last 12 s: 1 malformed"
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_broken_summary_is_logged_not_raised(self) -> None:
        listener = AnnouncementListener(ME, PeerPool(self.clock, ttl=15), clock=self.clock)
        FakeDatagramPort(listener, 11436)
        listener.datagramReceived(b"junk", CLIENT)

        def broken() -> None:
            raise RuntimeError("boom")

        self.patch(listener.ignored, "flush", broken)
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        listener.datagramReceived(b"junk", CLIENT)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "counting again")

    def test_spoofed_sources_are_counted_up_to_a_bound(self) -> None:
        listener = AnnouncementListener(ME, PeerPool(self.clock, ttl=15), clock=self.clock)
        FakeDatagramPort(listener, 11436)
        for n in range(3000):
            listener.datagramReceived(b"junk", (f"198.18.{n // 256}.{n % 256}", 11436))
        self.clock.advance(60)
        [line] = loud(self.logs.events)
        self.assertEqual((line["count"], line["hosts"]), (3000, 1000))
        self.assertEqual(
            formatEvent(line),
            "Ignored 3,000 datagrams from 1,000 hosts or more in the last 60 s: 3,000 malformed",
        )
