"""The logs: JSON lines for machines, levels and rotated files, the access line (a client
node's checks at debug, streams cut short), and an idle LAN that writes nothing."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import treq
from twisted.internet import defer, error, task
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    textFileLogObserver,
)
from twisted.python import log as legacy
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from ollana import logs
from ollana.logs import (
    LOG_LEVEL_ENV,
    LOGFILE_ENV,
    JSONLines,
    json_observer,
    log_observer,
    text_observer,
)
from ollana.proxy import ProxySettings
from ollana.site import ProxySite
from ollana.upstream import Router, Upstream, make_agent
from tests.support.fake_ollama import FakeOllama
from tests.support.fakes import capture_logs
from tests.support.processes import ChildProcess, eventually, free_udp_port, read_text

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


class JSONLinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher(JSONLines(self.out))
        self.log = Logger(namespace="ollana.access", observer=self.publisher)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_an_event_with_its_fields(self) -> None:
        self.log.info("{method} {path} {status}", method="GET", path="/api/tags", status=200,
                      peer=None, odd=object())  # fmt: skip
        [record] = self.records()
        self.assertEqual(record["message"], "GET /api/tags 200")
        self.assertEqual((record["level"], record["namespace"]), ("info", "ollana.access"))
        self.assertEqual((record["method"], record["status"], record["peer"]),
                         ("GET", 200, None))  # fmt: skip
        self.assertTrue(record["odd"].startswith("<object object"))
        self.assertTrue(record["time"].endswith("+00:00"))
        self.assertEqual(self.out.getvalue().count("\n"), 1)

    def test_a_failure_has_its_traceback(self) -> None:
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            self.log.failure("Broke")
        [record] = self.records()
        self.assertEqual((record["message"], record["level"]), ("Broke", "critical"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_a_legacy_event(self) -> None:
        publisher = legacy.LogPublisher()
        publisher.addObserver(lambda event: self.publisher(dict(event, log_namespace="x")))
        publisher.msg("Server Shut Down.")
        [record] = self.records()
        self.assertEqual(record["message"], "Server Shut Down.")
        self.assertNotIn("isError", record)


class TwistdJSONLoggerTests(TestCase):
    timeout = 30

    async def test_twistd_logs_json_lines(self) -> None:
        server = ChildProcess.spawn(reactor, [
            *TWISTD, "-n", "--pidfile=", "--logger", "ollana.logs.json_observer", "ollana",
            "--mode", "client", "--no-discovery", "--peer", "127.0.0.1:9",
            "--listen", "tcp:0:interface=127.0.0.1", "--discovery-port", str(free_udp_port()),
        ])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        listening = r'"message": "Listening for HTTP on 127\.0\.0\.1:(\d+)"'
        port = (await server.wait_for(listening)).group(1)
        # An answer means the reactor runs, so twistd's SIGTERM handler is in place.
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port}/ollana/api/status", pool=pool)
        self.assertEqual((await response.json())["mode"], "client")
        await server.stop()
        records = [json.loads(line) for line in server.lines if line.strip()]
        self.assertIn("Server Shut Down.", [record["message"] for record in records])


class LogObserverTests(SynchronousTestCase):
    """What twistd's --logger factories of ollana.logs write: by level, rotated."""

    def emit(self, observer: Any, level: str, text: str) -> None:
        getattr(Logger(namespace="ollana.test", observer=observer), level)(text)

    def test_debug_only_when_asked_for(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        quiet = log_observer(JSONLines, {})
        for level in ("debug", "info", "warn"):
            self.emit(quiet, level, level)
        chatty = log_observer(JSONLines, {LOG_LEVEL_ENV: "DEBUG "})
        self.emit(chatty, "debug", "debug, asked for")
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([r["message"] for r in records], ["info", "warn", "debug, asked for"])

    def test_an_unknown_level_is_said_and_info_used(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = log_observer(textFileLogObserver, {LOG_LEVEL_ENV: "loud"})
        self.emit(observer, "debug", "not this")
        self.emit(observer, "info", "this")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn(
            "[ollana.logs#warn] $OLLANA_LOG_LEVEL must be one of debug, info, warn, error, "
            "critical, not 'loud': logging at info",
            lines[0],
        )
        self.assertTrue(lines[1].endswith("[ollana.test#info] this"))

    def test_the_file_rotates_with_a_few_old_ones_kept(self) -> None:
        self.patch(logs, "ROTATE_BYTES", 2000)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "ollana.log")
        observer = log_observer(textFileLogObserver, {LOGFILE_ENV: path})
        for n in range(1000):
            self.emit(observer, "info", f"line {n:04} " + "x" * 80)
        self.assertEqual(
            sorted(os.listdir(directory)), ["ollana.log", *(f"ollana.log.{n}" for n in range(1, 6))]
        )
        with open(path) as f:
            self.assertIn("line 0999", f.read())
        with open(path + ".1") as f:
            self.assertNotIn("line 0999", f.read())

    def test_a_factory_for_twistd_of_each_format(self) -> None:
        self.assertIsInstance(text_observer(), FilteringLogObserver)
        self.assertIsInstance(json_observer(), FilteringLogObserver)


class TwistdTextLoggerTests(TestCase):
    timeout = 30

    async def test_junk_datagrams_are_one_line_and_debug_is_left_out(self) -> None:
        directory = os.path.abspath(self.mktemp())  # the child runs elsewhere
        os.makedirs(directory)
        path = os.path.join(directory, "ollana.log")
        discovery = free_udp_port()
        server = ChildProcess.spawn(reactor, [
            *TWISTD, "-n", "--pidfile=", "--logger", "ollana.logs.text_observer", "ollana",
            "--mode", "client", "--peer", "127.0.0.1:9", "--broadcast", "127.255.255.255",
            "--listen", "tcp:0:interface=127.0.0.1", "--discovery-port", str(discovery),
        ], prefix=["env", f"{LOGFILE_ENV}={path}"])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        await eventually(reactor, lambda: "Listening for HTTP" in read_text(path))
        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        for n in range(500):  # loopback only
            sender.write(b"junk %d" % n, ("127.0.0.1", discovery))
        await task.deferLater(reactor, 0.5)
        await server.stop()
        text = read_text(path)
        self.assertIn("Open files:", text)
        self.assertRegex(
            text, r"Ignored \d+ datagrams from 1 host in the last \d+ s: \d+ malformed"
        )
        self.assertNotIn("#debug]", text)
        self.assertLess(len(text.splitlines()), 40)


CLIENT = IPv4Address("TCP", "198.18.0.50", 40000)
SERVER = Upstream("http://127.0.0.1:11434", peer="198.18.0.2:11435")


class Proxied:
    """A proxy site in memory, all to SERVER: one client connection, and the upstream
    connection its request opens."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        proxy = ProxySettings(make_agent(self.reactor, connect_timeout=5), Router(SERVER),
                              self.reactor)  # fmt: skip
        self.channel = ProxySite(proxy).buildProtocol(CLIENT)
        self.client = StringTransport(peerAddress=CLIENT)
        self.channel.makeConnection(self.client)
        self.upstream: Any = None  # the upstream side of the connection a request opens

    def ask(self, head: bytes) -> None:
        """Send a request, and accept its upstream connection."""
        self.channel.dataReceived(head)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.upstream.makeConnection(StringTransport())

    def answer(self, data: bytes) -> None:
        self.upstream.dataReceived(data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"


class AccessLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = Proxied()
        self.logged = capture_logs(self)

    def line(self) -> dict[str, Any]:
        [event] = [e for e in self.logged if e.get("log_namespace") == "ollana.access"]
        return event

    def test_a_client_nodes_check_is_debug(self) -> None:
        self.proxy.ask(b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Ollana-Check: health\r\n\r\n")
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.line()["log_level"], LogLevel.debug)

    def test_other_requests_are_info(self) -> None:
        for head in (
            b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n",  # an app's
            b"GET /api/ps HTTP/1.1\r\nHost: x\r\nX-Ollana-Check: health\r\n\r\n",
        ):
            proxy = Proxied()
            proxy.ask(head)
            proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        levels = [e["log_level"] for e in self.logged if e.get("log_namespace") == "ollana.access"]
        self.assertEqual(levels, [LogLevel.info, LogLevel.info])

    def test_a_whole_stream_is_not_cut(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD + b"0\r\n\r\n")
        line = self.line()
        self.assertIsNone(line["cut"])
        self.assertTrue(line["summary"].endswith(" B"), line["summary"])

    def test_a_stream_cut_by_the_client(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD)
        self.proxy.channel.connectionLost(Failure(error.ConnectionLost()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (200, "client"))
        self.assertTrue(line["summary"].endswith(" B cut by client"), line["summary"])

    def test_a_stream_cut_by_the_upstream(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD)
        self.proxy.upstream.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(self.proxy.client.disconnecting, "the client's connection is cut")
        self.proxy.channel.connectionLost(Failure(error.ConnectionAborted()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (200, "upstream"))
        self.assertTrue(line["summary"].endswith(" B cut by upstream"), line["summary"])

    def test_a_client_gone_before_the_answer_is_499_not_cut(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.channel.connectionLost(Failure(error.ConnectionLost()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (499, None))


class IdleLANTests(TestCase):
    """One server and two clients on loopback, as ollana serve runs them: once started,
    nothing is logged at the default level while they only check on each other."""

    timeout = 90
    QUIET = 10.0  # seconds watched; with checks every second, as many as a minute at 5 s

    def node(self, *args: str) -> ChildProcess:
        child = ChildProcess.spawn(reactor, ["-m", "ollana", "serve", *self.lan, *args])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def served(self, url: str) -> float:
        """Requests the server has proxied so far (its metrics)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url + "/ollana/metrics", pool=pool)
        text = (await response.content()).decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ollana_requests_total{"))  # fmt: skip

    async def test_nothing_is_logged_while_idle(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        ollama = reactor.listenTCP(0, fake.site(access_log=False), interface="127.0.0.1")
        self.addCleanup(ollama.stopListening)
        self.lan = ["--broadcast", "127.255.255.255", "--discovery-port", str(free_udp_port()),
                    "--listen", "tcp:0:interface=127.0.0.1", "--health-interval", "1"]  # fmt: skip
        server = self.node("--mode", "server",
                           "--ollama", f"http://127.0.0.1:{ollama.getHost().port}")  # fmt: skip
        listening = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        url = f"http://127.0.0.1:{listening.group(1)}"
        clients = [self.node("--mode", "client", "--probe-interval", "1",
                             "--models-interval", "1") for _ in range(2)]  # fmt: skip
        for client in clients:
            await client.wait_for(f"Found server .* at {url} ")
        await task.deferLater(reactor, 1.5)  # the first checks, and their first model lists
        before = await self.served(url)
        await server.wait_for(r"GET /ollana/metrics ")  # that request's own line
        nodes = [server, *clients]
        counts = [len(node.lines) for node in nodes]
        await task.deferLater(reactor, self.QUIET)
        new = [line for node, count in zip(nodes, counts, strict=True)
               for line in node.lines[count:]]  # fmt: skip
        self.assertEqual(new, [])
        checks = await self.served(url) - before
        self.assertGreater(checks, 2 * self.QUIET, "the clients checked all along")
