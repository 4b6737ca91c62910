"""twistd ollana: option parsing, and the service tree that each mode builds."""

from __future__ import annotations

import os
import socket
from collections import namedtuple
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from ollana import wire
from ollana.netif import broadcast_addresses
from ollana.node import OllanaService
from ollana.tap import Options, makeService
from tests.fake_ollama import FakeOllama
from tests.support import FakeNetworkReactor

SAFE = ["--broadcast", "127.255.255.255"]


def parse(*args: str, env: dict[str, str] | None = None) -> Options:
    options = Options()
    old = os.environ.pop("OLLAMA_HOST", None)
    try:
        if env:
            os.environ.update(env)
        options.parseOptions(list(args))
    finally:
        os.environ.pop("OLLAMA_HOST", None)
        if old is not None:
            os.environ["OLLAMA_HOST"] = old
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        s = parse(*SAFE).settings()
        self.assertEqual(
            (s.mode, s.ollama_url, s.listen, s.discovery, s.discovery_port),
            ("auto", "http://127.0.0.1:11434", None, True, 11436),
        )
        self.assertEqual((s.discovery_interface, s.broadcast), ("", ("127.255.255.255",)))
        self.assertEqual((s.probe_interval, s.health_interval, s.peers), (5.0, 5.0, ()))
        self.assertEqual(len(s.node_id), 16)
        self.assertEqual(s.listen_for("client"), "tcp:11434:interface=127.0.0.1")
        self.assertEqual(s.listen_for("server"), "tcp:11435")

    def test_everything_given(self) -> None:
        s = parse(
            "--mode",
            "server",
            "--ollama",
            "http://10.1.2.3:8080",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--discovery-port",
            "12000",
            "--discovery-interface",
            "127.0.0.1",
            "--broadcast",
            "127.255.255.255",
            "--broadcast",
            "198.18.0.255",
            "--probe-interval",
            "2.5",
            "--health-interval",
            "1",
            "--peer",
            "box:11435",
            "--peer",
            "[fd00::1]:8000",
            "--peer",
            "gpu",
        ).settings()
        self.assertEqual(s.mode, "server")
        self.assertEqual(s.ollama_url, "http://10.1.2.3:8080")
        self.assertEqual(s.listen_for("client"), "tcp:0:interface=127.0.0.1")
        self.assertEqual((s.discovery_port, s.discovery_interface), (12000, "127.0.0.1"))
        self.assertEqual(s.broadcast, ("127.255.255.255", "198.18.0.255"))
        self.assertEqual((s.probe_interval, s.health_interval), (2.5, 1.0))
        self.assertEqual(s.peers, (("box", 11435), ("fd00::1", 8000), ("gpu", 11435)))

    def test_no_discovery_needs_no_broadcast_addresses(self) -> None:
        s = parse("--no-discovery").settings()
        self.assertEqual((s.discovery, s.broadcast), (False, ()))

    def test_ollama_host_from_the_environment(self) -> None:
        cases = {
            "0.0.0.0": "http://127.0.0.1:11434",
            "0.0.0.0:9999": "http://127.0.0.1:9999",
            ":9999": "http://127.0.0.1:9999",
            "gpu.lan": "http://gpu.lan:11434",
            "https://gpu.lan": "https://gpu.lan:443",
            "http://[::]:11434/": "http://[::1]:11434",
            "[fd00::2]:11434": "http://[fd00::2]:11434",
        }
        for value, url in cases.items():
            self.assertEqual(parse(*SAFE, env={"OLLAMA_HOST": value})["ollama"], url, value)
        options = parse(*SAFE, "--ollama", "127.0.0.1:1234", env={"OLLAMA_HOST": "gpu.lan"})
        self.assertEqual(options["ollama"], "http://127.0.0.1:1234")

    def assertUsage(self, args: list[str], reason: str, env: dict[str, str] | None = None) -> None:
        e = self.assertRaises(UsageError, parse, *args, env=env)
        self.assertEqual(str(e), reason)
        self.assertNotIn("\n", str(e))

    def test_bad_values_give_one_line_reasons(self) -> None:
        self.assertUsage(["--mode", "both"], "--mode: must be auto, server or client, not 'both'")
        self.assertUsage(["--discovery-port", "0"], "--discovery-port: port must be 1-65535, not 0")
        self.assertUsage(["--discovery-port", "x"], "--discovery-port: not a port number: 'x'")
        self.assertUsage(["--broadcast", "lan"], "--broadcast: not an IPv4 address: 'lan'")
        self.assertUsage(
            ["--discovery-interface", "eth0"], "--discovery-interface: not an IPv4 address: 'eth0'"
        )
        self.assertUsage(
            ["--probe-interval", "0"],
            "--probe-interval: must be between 0.1 and 86400 seconds, not 0",
        )
        self.assertUsage(
            ["--health-interval", "nan"],
            "--health-interval: must be between 0.1 and 86400 seconds, not nan",
        )
        self.assertUsage(["--peer", "box:99999"], "--peer: port must be 1-65535, not 99999")
        self.assertUsage(
            ["--peer", "fd00::1"], "--peer: write an IPv6 peer as [ADDRESS]:PORT, not 'fd00::1'"
        )
        self.assertUsage(["--peer", "http://box"], "--peer: expected HOST:PORT, not 'http://box'")
        self.assertUsage(
            ["--ollama", "ftp://x"], "--ollama: scheme must be http or https, not 'ftp'"
        )
        self.assertUsage(
            ["--ollama", "http://x/api"],
            "--ollama: give only scheme, host and port, not 'http://x/api'",
        )
        self.assertUsage(
            [],
            "OLLAMA_HOST: scheme must be http or https, not 'ftp'",
            env={"OLLAMA_HOST": "ftp://x"},
        )
        self.assertUsage(
            ["--listen", "tcp:abc"],
            "--listen: not a valid endpoint description: 'tcp:abc' "
            "(invalid literal for int() with base 10: 'abc')",
        )
        self.assertUsage(
            ["--listen", "carrier-pigeon:1"],
            "--listen: not a valid endpoint description: 'carrier-pigeon:1' "
            "(Unknown endpoint type: 'carrier-pigeon')",
        )
        self.assertUsage(
            ["--mode", "client", "--no-discovery"],
            "--no-discovery in client mode needs at least one --peer",
        )


Entry = namedtuple("Entry", "family address netmask broadcast")
Stat = namedtuple("Stat", "isup")


class BroadcastAddressTests(SynchronousTestCase):
    def test_directed_broadcast_of_up_non_loopback_ipv4_interfaces(self) -> None:
        addresses = {
            "lo": [Entry(socket.AF_INET, "127.0.0.1", "255.0.0.0", None)],
            "eth0": [
                Entry(socket.AF_INET, "198.18.0.2", "255.255.255.0", "198.18.0.255"),
                Entry(socket.AF_INET6, "fd00::2", "ffff:ffff:ffff:ffff::", None),
            ],
            "wlan0": [Entry(socket.AF_INET, "198.18.4.9", "255.255.252.0", None)],
            "eth1": [Entry(socket.AF_INET, "198.18.0.3", "255.255.255.0", "198.18.0.255")],
            "down0": [Entry(socket.AF_INET, "198.18.9.1", "255.255.255.0", "198.18.9.255")],
            "tun0": [Entry(socket.AF_INET, "198.18.8.1", "255.255.255.255", None)],
            "gone": [Entry(socket.AF_INET, "198.18.7.1", "255.255.255.0", None)],
        }
        stats = {name: Stat(name != "down0") for name in addresses if name != "gone"}
        self.assertEqual(broadcast_addresses(addresses, stats), ["198.18.0.255", "198.18.7.255"])

    def test_none_found(self) -> None:
        lo = {"lo": [Entry(socket.AF_INET, "127.0.0.1", "255.0.0.0", None)]}
        self.assertEqual(broadcast_addresses(lo, {"lo": Stat(True)}), [])


def service_names(service: OllanaService) -> list[str]:
    return [child.name for child in service]


class ServiceTreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeNetworkReactor()

    def make(self, *args: str, http: Any = None) -> OllanaService:
        options = parse(*SAFE, "--discovery-port", "12000", *args)
        if http is None:
            return makeService(options, reactor=self.reactor)
        return OllanaService(options.settings(), self.reactor, http)

    def test_server_mode(self) -> None:
        service = self.make("--mode", "server")
        self.assertEqual(service.mode, "server")
        self.assertEqual(service_names(service), ["ollama-monitor", "http", "discovery"])

    def test_server_mode_without_discovery(self) -> None:
        service = self.make("--mode", "server", "--no-discovery")
        self.assertEqual(service_names(service), ["ollama-monitor", "http"])

    def test_client_mode(self) -> None:
        service = self.make("--mode", "client", "--peer", "box:11435")
        self.assertEqual(service.mode, "client")
        self.assertEqual(service_names(service), ["discovery", "http"])
        self.assertEqual([p.url for p in service.pool], ["http://box:11435"])

    def test_client_mode_without_discovery(self) -> None:
        service = self.make("--mode", "client", "--no-discovery", "--peer", "box")
        self.assertEqual(service_names(service), ["http"])

    def test_client_mode_listens_on_loopback_11434(self) -> None:
        service = self.make("--mode", "client")
        service.startService()
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (11434, "127.0.0.1"))
        udp = [p.port for p in self.reactor.udp_ports]
        self.assertEqual(udp[0], 12000)

    def test_server_mode_listens_on_11435_and_answers_once_ollama_is_up(self) -> None:
        service = self.make("--mode", "server", http=StubTreq(FakeOllama().resource()))
        service.startService()
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (11435, ""))
        [udp] = self.reactor.udp_ports
        [(data, target)] = udp.take()
        self.assertEqual(target, ("127.255.255.255", 12000))
        self.assertIsInstance(wire.decode(data), wire.Announce)

    def test_auto_mode_becomes_server_when_ollama_answers(self) -> None:
        service = self.make(http=StubTreq(FakeOllama().resource()))
        self.assertEqual((service.mode, service_names(service)), (None, []))
        service.startService()
        self.assertEqual(service.mode, "server")
        self.assertEqual(service_names(service), ["ollama-monitor", "http", "discovery"])
        self.assertTrue(all(child.running for child in service))

    def test_auto_mode_becomes_client_when_nothing_answers(self) -> None:
        service = self.make(http=Refusing())
        service.startService()
        self.assertIsNone(service.mode)
        self.reactor.pump([0.5] * 4)
        self.assertEqual(service.mode, "client")
        self.assertEqual(service_names(service), ["discovery", "http"])
        self.assertTrue(all(child.running for child in service))

    def test_stopping_during_the_choice_builds_nothing(self) -> None:
        service = self.make(http=Refusing())
        service.startService()
        service.stopService()
        self.reactor.pump([0.5] * 10)
        self.assertEqual((service.mode, service_names(service)), (None, []))

    def test_a_start_up_failure_stops_the_reactor(self) -> None:
        self.reactor.busy_udp_ports.add(12000)
        service = self.make("--mode", "client")
        service.startService()
        self.assertEqual(
            service.failure,
            "Cannot listen on UDP port 12000: Address already in use. "
            "Choose another with --discovery-port.",
        )
        self.assertFalse(self.reactor.hasStopped)
        self.reactor.run()
        self.assertTrue(self.reactor.hasStopped)


class Refusing:
    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(error.ConnectionRefusedError())
