"""twistd ollana: option parsing, and the service tree that each mode builds."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import sys
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IReactorFromThreads
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ollana import __version__, config, wire
from ollana.netif import broadcast_addresses
from ollana.node import OllanaService
from ollana.tap import OPTION_GROUPS, Options, SecondSignal, StartReport, makeService, start_line
from tests.support.fake_ollama import FakeOllama
from tests.support.fakes import FakeNetworkReactor, FakeServers, capture_logs
from tests.support.http import Silent

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
            "https://gpu",
        ).settings()
        self.assertEqual(s.mode, "server")
        self.assertEqual(s.ollama_url, "http://10.1.2.3:8080")
        self.assertEqual(s.listen_for("client"), "tcp:0:interface=127.0.0.1")
        self.assertEqual((s.discovery_port, s.discovery_interface), (12000, "127.0.0.1"))
        self.assertEqual(s.broadcast, ("127.255.255.255", "198.18.0.255"))
        self.assertEqual((s.probe_interval, s.health_interval), (2.5, 1.0))
        self.assertEqual(
            s.peers, (("box", 11435, "http"), ("fd00::1", 8000, "http"), ("gpu", 11435, "https"))
        )

    def test_unix_socket_where_nothing_is_announced(self) -> None:
        for args in (["--mode", "client"], ["--mode", "server", "--no-discovery"]):
            options = parse(*SAFE, *args, "--listen", "unix:/run/ollana.sock")
            self.assertEqual(options["listen"], "unix:/run/ollana.sock")

    def test_endpoint_scheme(self) -> None:
        self.assertEqual(config.endpoint_scheme("tcp:11435"), "http")
        self.assertEqual(config.endpoint_scheme("11435"), "http")
        self.assertEqual(config.endpoint_scheme("ssl:443:privateKey=k.pem"), "https")

    def test_listen_backlog(self) -> None:
        """Bursts of connections are queued (Twisted's own default is 50), unless the
        description says otherwise or is not TCP."""
        cases = {
            "tcp:11435:interface=127.0.0.1": 1024,
            "11435": 1024,
            "tcp6:0:interface=\\:\\:1": 1024,
            "tcp:11435:backlog=7": 7,
            "tcp:11435:127.0.0.1:9": 9,  # positional: port, interface, backlog
        }
        for description, backlog in cases.items():
            reactor = MemoryReactor()
            serverFromString(reactor, config.with_backlog(description)).listen(Factory())
            listened = (reactor.tcpServers or reactor.sslServers)[0]
            self.assertEqual(listened[2], backlog, description)
        self.assertEqual(config.with_backlog("unix:/run/o.sock"), "unix:/run/o.sock")
        ssl = "ssl:443:privateKey=k.pem:certKey=c.pem"
        self.assertEqual(config.with_backlog(ssl), ssl + ":backlog=1024")

    def test_no_discovery_needs_no_broadcast_addresses(self) -> None:
        s = parse("--mode", "server", "--no-discovery").settings()
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

    def test_security_options(self) -> None:
        secret_file = self.mktemp()
        with open(secret_file, "w") as f:
            f.write("a LAN secret of some length\n")
        s = parse(*SAFE, "--secret-file", secret_file, "--allow", "10.0.0.0/8", "--allow",
                  "fd00::/8", "--max-body", "10G", "--max-connections", "8",
                  "--header-timeout", "5").settings()  # fmt: skip
        self.assertEqual(s.secret, b"a LAN secret of some length")
        self.assertEqual([str(n) for n in s.allow or ()], ["10.0.0.0/8", "fd00::/8"])
        self.assertEqual((s.max_body, s.max_connections, s.header_timeout), (10 << 30, 8, 5.0))
        self.assertNotIn("LAN secret", repr(s))
        defaults = parse(*SAFE).settings()
        self.assertEqual((defaults.secret, defaults.allow, defaults.max_body), (None, None, None))
        self.assertEqual((defaults.max_connections, defaults.header_timeout), (256, 30.0))

    def test_bad_security_options(self) -> None:
        self.assertUsage(["--allow", "lan"], "--allow: not an address or CIDR block: 'lan'")
        self.assertUsage(
            ["--max-body", "lots"], "--max-body: not a size in bytes (like 8M or 512K): 'lots'"
        )
        self.assertUsage(["--tls-cert", "/x.crt"], "--tls-cert and --tls-key go together")
        e = self.assertRaises(UsageError, parse, "--tls-cert", "/nonexistent.crt", "--tls-key",
                              "/nonexistent.key")  # fmt: skip
        self.assertTrue(str(e).startswith("--tls: "), str(e))
        e = self.assertRaises(UsageError, parse, "--secret-file", "/nonexistent/secret")
        self.assertIn("--secret-file", str(e))
        self.assertNotIn("\n", str(e))

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
        self.assertUsage(["--peer", "ftp://box"], "--peer: expected HOST:PORT, not 'ftp://box'")
        self.assertUsage(["--peer", "https://box/x"], "--peer: expected HOST:PORT, not 'box/x'")
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
        self.assertUsage(["--listen", "tcp:99999"], "--listen: port must be 0-65535, not 99999")
        unix = "--listen: a server announces a TCP port, so use a tcp: or ssl: endpoint"
        self.assertUsage(
            ["--listen", "unix:/run/ollana.sock"],
            unix + " (or --mode client, or --no-discovery)",
        )
        self.assertUsage(
            ["--mode", "server", "--listen", "unix:/run/ollana.sock"],
            unix + " (or --mode client, or --no-discovery)",
        )
        self.assertUsage(
            ["--mode", "client", "--no-discovery"],
            "--no-discovery in client mode needs at least one --peer",
        )
        self.assertUsage(
            ["--no-discovery"],
            "--no-discovery in auto mode needs at least one --peer (or --mode server)",
        )
        parse("--no-discovery", "--peer", "box")  # auto mode that can find a server

    def test_ollama_must_be_an_http_url(self) -> None:
        self.assertUsage(
            ["--ollama", "not a url"], "--ollama: not an http(s) URL or HOST:PORT: 'not a url'"
        )
        self.assertUsage(
            ["--ollama", "http://gpu..lan"],
            "--ollama: not an http(s) URL or HOST:PORT: 'http://gpu..lan'",
        )
        self.assertUsage(
            [], "OLLAMA_HOST: not an http(s) URL or HOST:PORT: 'a b'", env={"OLLAMA_HOST": "a b"}
        )
        for good in ("gpu-1.lan", "my_box", "http://[fe80::1]:11434", "10.0.0.2:1"):
            parse(*SAFE, "--ollama", good)


class HelpTests(SynchronousTestCase):
    """twistd ollana --help: the options under headings; --version: Ollana's."""

    def test_options_under_headings(self) -> None:
        text = Options().getUsage(width=100)
        headings = [line[:-1] for line in text.splitlines() if line and line[0] != " "]
        self.assertEqual(
            headings[:7], ["Mode", "Discovery", "Routing", "Security", "Limits", "Logging", "Other"]
        )
        sections = dict(zip(headings, re.split(r"^\S.*:\n", text, flags=re.M)[1:], strict=False))
        self.assertIn("--mode=", sections["Mode"])
        self.assertIn("--broadcast=", sections["Discovery"])
        self.assertIn("--strategy=", sections["Routing"])
        self.assertIn("--secret-file=", sections["Security"])
        self.assertIn("--max-body=", sections["Limits"])
        self.assertIn("$OLLANA_LOG_LEVEL", sections["Logging"])
        self.assertIn("--version", sections["Other"])
        listed = re.findall(r"^ {2}(?:-\w,| {3}) --([\w-]+)", text, flags=re.M)
        self.assertEqual(sorted(listed), sorted(o.rstrip("=") for o in Options().longOpt))
        self.assertTrue(text.rstrip().endswith("(client mode)."), "the description last")

    def test_every_option_has_a_heading(self) -> None:
        grouped = {name for _, names in OPTION_GROUPS for name in names}
        self.assertEqual({o.rstrip("=") for o in Options().longOpt} - grouped, set())

    def test_columns_line_up_across_headings(self) -> None:
        text = Options().getUsage(width=100)
        options = re.findall(r"^ {2}(?:-\w,| {3}) --[\w-]+=? +", text, flags=re.M)
        self.assertEqual({len(start) for start in options}, {len(options[0])}, options)

    def test_version_is_ollanas(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertEqual((e.code, out.getvalue()), (0, f"ollana {__version__}\n"))


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
        return OllanaService(options.settings(), self.reactor, http, no_lookup)

    def test_the_client_pins_what_its_servers_announce(self) -> None:
        for service in (
            self.make("--mode", "client"),
            self.make("--mode", "client", http=FakeServers(self.reactor)),
        ):
            fingerprint = bytes(range(32))
            announce = wire.Announce(bytes(16), 11435, "https", "1.0", fingerprint)
            service.pool.announced(announce, "198.18.0.2")
            pinned = service.client_tls.creator("198.18.0.2", fingerprint)
            self.assertIs(service.client_tls.creator_for("198.18.0.2", 11435), pinned)
            self.assertIsNot(service.client_tls.creator_for("198.18.0.3", 11435), pinned)

    def test_server_mode(self) -> None:
        service = self.make("--mode", "server")
        self.assertEqual(service.mode, "server")
        self.assertEqual(
            service_names(service),
            [
                "ollama-monitor",
                "ollama-load",
                "upstream-connections",
                "http",
                "discovery",
                "health-connections",
            ],
        )

    def test_server_mode_without_discovery(self) -> None:
        service = self.make("--mode", "server", "--no-discovery")
        self.assertEqual(
            service_names(service),
            ["ollama-monitor", "ollama-load", "upstream-connections", "http", "health-connections"],
        )

    def test_client_mode(self) -> None:
        service = self.make("--mode", "client", "--peer", "box:11435")
        self.assertEqual(service.mode, "client")
        self.assertEqual(
            service_names(service),
            ["discovery", "health", "upstream-connections", "http", "health-connections"],
        )
        self.assertEqual([p.url for p in service.pool], ["http://box:11435"])

    def test_client_mode_without_discovery(self) -> None:
        service = self.make("--mode", "client", "--no-discovery", "--peer", "box")
        self.assertEqual(
            service_names(service),
            ["health", "upstream-connections", "http", "health-connections"],
        )

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
        self.assertEqual(
            service_names(service),
            ["ollama-monitor", "ollama-load", "upstream-connections", "http", "discovery"],
        )
        self.assertTrue(all(child.running for child in service))

    def test_auto_mode_becomes_client_when_nothing_answers(self) -> None:
        service = self.make(http=Refusing())
        service.startService()
        self.assertIsNone(service.mode)
        self.reactor.pump([0.5] * 4)
        self.assertEqual(service.mode, "client")
        self.assertEqual(
            service_names(service), ["discovery", "health", "upstream-connections", "http"]
        )
        self.assertTrue(all(child.running for child in service))

    def test_stopping_during_the_choice_cancels_it(self) -> None:
        silent = Silent()
        stub = StubTreq(silent)
        service = self.make(http=Counting(stub))
        service.startService()
        [request] = silent.pending
        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)
        service.stopService()
        stub.flush()
        self.assertEqual(len(lost), 1, "the request in flight is cancelled")
        self.reactor.pump([0.5] * 10)
        self.assertEqual(service._http.calls, 1)  # type: ignore[attr-defined]
        self.assertEqual((service.mode, service_names(service)), (None, []))

    def test_a_start_up_failure_stops_the_reactor(self) -> None:
        self.reactor.busy_udp_ports.add(12000)
        stops: list[bool] = []
        self.patch(self.reactor, "stop", lambda: stops.append(True))
        service = self.make("--mode", "client")
        service.startService()
        self.assertEqual(
            service.failure,
            "Cannot listen on UDP port 12000: Address already in use. "
            "Choose another with --discovery-port.",
        )
        self.assertEqual(stops, [])
        self.reactor.running = True
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)
        self.assertEqual(stops, [True])

    def test_server_answers_only_while_ollama_is_up(self) -> None:
        http = Switchable(StubTreq(FakeOllama().resource()))
        service = self.make("--mode", "server", "--health-interval", "5", http=http)
        service.startService()
        [udp] = self.reactor.udp_ports
        target = ("127.255.255.255", 12000)
        [(data, to)] = udp.take()
        node = wire.decode(data).node_id  # type: ignore[union-attr]
        self.assertEqual(to, target)
        probe = wire.encode(wire.Probe(b"\x01" * 16))
        udp.protocol.datagramReceived(probe, ("127.0.0.1", 50000))
        self.assertEqual(len(udp.take()), 1)

        http.up = False
        self.reactor.advance(5)
        self.assertEqual(udp.take(), [(wire.encode(wire.Bye(node)), target)])
        udp.protocol.datagramReceived(probe, ("127.0.0.1", 50000))
        udp.protocol.datagramReceived(b"LANA", ("127.0.0.1", 50001))
        self.assertEqual(udp.take(), [])

        http.up = True
        self.reactor.advance(5)
        [(data, to)] = udp.take()
        self.assertEqual(
            (wire.decode(data), to), (wire.Announce(node, 11435, "http", __version__), target)
        )


class Refusing:
    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(error.ConnectionRefusedError())


class Counting:
    def __init__(self, http: Any) -> None:
        self.http = http
        self.calls = 0

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        return self.http.get(url, **kwargs)


class Switchable:
    """Passes requests on while up, refuses them while down."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.up = True

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        if not self.up:
            return defer.fail(error.ConnectionRefusedError())
        return self.http.get(url, **kwargs)


def no_lookup() -> list[str]:
    raise AssertionError("tests must not look up this machine's broadcast addresses")


class Starting:
    """What start_line reads of an OllanaService: why it failed, or where it listens."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.listening: IAddress | None = None

    def address(self) -> IAddress | None:
        return self.listening


class Unreadable(Starting):
    def address(self) -> IAddress | None:
        raise RuntimeError("broken")


class StartReportTests(SynchronousTestCase):
    """What the daemon of ollana serve -d says on its pipe (StartReport)."""

    def setUp(self) -> None:
        self.service = Starting()
        self.clock = Clock()
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.read = read
        self.report = StartReport(write)

    def said(self) -> bytes:
        """What the pipe holds, to its end (the report closed it)."""
        data = b""
        while chunk := os.read(self.read, 4096):
            data += chunk
        return data

    def test_lines(self) -> None:
        service = Starting()
        self.assertIsNone(start_line(service, 42), "not listening yet")
        service.listening = IPv4Address("TCP", "127.0.0.1", 11435)
        self.assertEqual(start_line(service, 42), "ready 42 127.0.0.1:11435")
        service.listening = IPv6Address("TCP", "::1", 11435)
        self.assertEqual(start_line(service, 42), "ready 42 [::1]:11435")
        service.listening = UNIXAddress("/run/ollana.sock")
        self.assertEqual(start_line(service, 42), "ready 42 /run/ollana.sock")
        service.failure = "Cannot listen on UDP port 1:\nin use"
        self.assertEqual(start_line(service, 42), "failed Cannot listen on UDP port 1: in use")

    def test_says_once_it_listens(self) -> None:
        self.report.watch(self.service, self.clock)
        self.clock.advance(0.5)
        self.service.listening = IPv4Address("TCP", "127.0.0.1", 11435)
        self.clock.advance(0.1)
        self.assertEqual(self.said(), f"ready {os.getpid()} 127.0.0.1:11435\n".encode())
        self.assertEqual(self.clock.getDelayedCalls(), [], "no more looking")
        self.report.say("failed later")  # the pipe is closed: nothing more, no error

    def test_says_why_it_failed(self) -> None:
        self.report.watch(self.service, self.clock)
        self.service.failure = "Cannot listen on TCP port 11435: Address already in use."
        self.clock.advance(0.1)
        self.assertEqual(
            self.said(), b"failed Cannot listen on TCP port 11435: Address already in use.\n"
        )

    def test_a_broken_look_is_said_not_raised(self) -> None:
        self.report.watch(Unreadable(), self.clock)
        self.assertEqual(
            self.said(), b"failed could not tell whether Ollana listens; see its log\n"
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nobody_asks(self) -> None:
        report = StartReport(None)
        report.watch(self.service, self.clock)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        report.say("ready 1 x")
        self.report.say("")
        self.assertEqual(self.said(), b"\n")


class Connection:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


@implementer(IReactorFromThreads)
class Stopping:
    """What SecondSignal needs of a reactor; calls from the signal handler run at once."""

    def __init__(self) -> None:
        self.connections = [Connection(), Connection()]
        self.port = object()  # a listening port, a UDP port: nothing to abort
        self.triggers: list[tuple[str, str, Callable[..., object]]] = []

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kw: object) -> None:
        callable(*args, **kw)

    def getReaders(self) -> list[Any]:  # Any: fakes of connections and ports
        return [self.port, *self.connections]

    def getWriters(self) -> list[Any]:
        return self.connections[:1]

    def addSystemEventTrigger(
        self,
        phase: str,
        eventType: str,
        callable: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> None:
        self.triggers.append((phase, eventType, callable))


class SecondSignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Stopping()
        self.first: list[int] = []
        self.handler = SecondSignal(self.reactor)
        self.handler.first = {signal.SIGINT: lambda n, f: self.first.append(n),
                              signal.SIGTERM: lambda n, f: self.first.append(n)}  # fmt: skip
        self.logged = capture_logs(self)

    def test_the_first_is_the_reactors_and_another_stops_now(self) -> None:
        self.handler(signal.SIGINT, None)
        self.assertEqual(self.first, [signal.SIGINT])
        self.assertEqual([c.aborted for c in self.reactor.connections], [False, False])
        self.handler(signal.SIGINT, None)
        self.assertEqual(self.first, [signal.SIGINT], "the reactor is not asked to stop again")
        self.assertEqual([c.aborted for c in self.reactor.connections], [True, True])
        [event] = [e for e in self.logged if e.get("count") is not None]
        self.assertEqual(formatEvent(event), "SIGINT again: stopping now, closing 2 connection(s)")

    def test_a_signal_once_stopping_for_another_reason_stops_now(self) -> None:
        self.reactor.triggers.clear()
        self.handler.install()
        [(phase, event, stopping)] = self.reactor.triggers
        self.assertEqual((phase, event), ("before", "shutdown"))
        stopping()  # a start-up failure stopped the reactor, say
        self.handler(signal.SIGTERM, None)
        self.assertEqual(self.first, [])
        self.assertTrue(all(c.aborted for c in self.reactor.connections))

    def test_install_stands_before_the_reactors_handlers(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        handler = SecondSignal(self.reactor)
        reactors = lambda n, f: None  # noqa: E731
        signal.signal(signal.SIGINT, reactors)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # not the reactor's: left alone
        handler.install()
        self.assertIs(signal.getsignal(signal.SIGINT), handler)
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_IGN)
        self.assertEqual(handler.first, {signal.SIGINT: reactors})
