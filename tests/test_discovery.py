"""Discovery protocols on fake datagram transports, and their services on a fake reactor."""

from __future__ import annotations

import errno

from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollana import wire
from ollana.config import Settings
from ollana.discovery import AnnouncementListener, ProbeResponder, Seeker
from ollana.node import HTTPListener, ResponderService, SeekerService
from ollana.peers import PeerPool, Source
from tests.support import FakeDatagramPort, FakeNetworkReactor, capture_logs

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
        self.responder = ProbeResponder(ME, lambda: TARGETS, "http", "0.1.0", lambda: self.serving)
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
        warnings = logs.at(LogLevel.warn)
        self.assertEqual(len(warnings), 3)
        self.assertEqual(warnings[0]["error"], "Network is unreachable")
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
        self.seeker = Seeker(ME, self.pool, lambda: TARGETS)
        self.own = FakeDatagramPort(self.seeker, 40001)
        self.listener = AnnouncementListener(ME, self.pool)
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
        def refuse(port: int, protocol: object, interface: str = "") -> None:
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
            ME, lambda: [("127.255.255.255", 11436)], "http", "0.1.0", lambda: self.serving
        )
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
