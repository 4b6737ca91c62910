"""Loopback integration: a real twistd ollana process, found by a real ollana discover.

Everything here stays on loopback: discovery goes to 127.255.255.255 on a free port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from typing import Any

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from ollana import wire
from ollana.discovery import AnnouncementListener
from ollana.peers import PeerPool
from tests.support.fake_ollama import FakeOllama
from tests.support.processes import (
    REPO,
    ChildProcess,
    eventually,
    free_udp_port,
    kill_quietly,
    process_alive,
    python_env,
    read_text,
)

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
LOOPBACK_BROADCAST = "127.255.255.255"
LOOPBACK_LISTEN = "tcp:0:interface=127.0.0.1"


class Recorder(AnnouncementListener):
    """Hears what servers broadcast on the discovery port."""

    def __init__(self) -> None:
        super().__init__(bytes(16), PeerPool(reactor, ttl=60), clock=reactor)
        self.messages: list[wire.Message] = []
        self.arrived: list[defer.Deferred[None]] = []

    def handle(self, message: wire.Message, addr: tuple[str, int]) -> None:
        self.messages.append(message)
        super().handle(message, addr)
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            d.callback(None)

    def next_message(self, timeout: float = 10) -> defer.Deferred[wire.Message]:
        """Fires with the next message heard from now on."""
        d: defer.Deferred[None] = defer.Deferred()
        self.arrived.append(d)
        d.addTimeout(timeout, reactor)
        return d.addCallback(lambda _: self.messages[-1])


class LegacyClient(DatagramProtocol):
    """The original Ollana's client: sends the bare magic, reads a reply."""

    def __init__(self) -> None:
        self.reply: defer.Deferred[tuple[bytes, tuple[str, int]]] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.reply.called:
            self.reply.callback((datagram, addr))


class ServerProcessTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.fake = FakeOllama(version="0.12.3")
        self.ollama = reactor.listenTCP(0, self.fake.site(), interface="127.0.0.1")
        self.addCleanup(self.ollama.stopListening)
        self.discovery_port = free_udp_port()
        self.recorder = Recorder()
        udp = reactor.listenMulticast(
            self.discovery_port, self.recorder, interface="", listenMultiple=True
        )
        self.addCleanup(udp.stopListening)

    def ollana(self, mode: str, *extra: str, listen: str = LOOPBACK_LISTEN) -> list[str]:
        """Arguments for twistd -n ollana in this mode, on loopback only."""
        return [
            *TWISTD, "-n", "--pidfile=", "ollana", "--mode", mode, "--listen", listen,
            "--broadcast", LOOPBACK_BROADCAST, "--discovery-port", str(self.discovery_port),
            *extra,
        ]  # fmt: skip

    def start_server(self, listen: str = LOOPBACK_LISTEN) -> ChildProcess:
        ollama = f"http://127.0.0.1:{self.ollama.getHost().port}"
        server = ChildProcess.spawn(
            reactor,
            self.ollana("server", "--ollama", ollama, "--health-interval", "1", listen=listen),
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        return server

    def discover(self, *extra: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "ollana",
                "discover",
                "--broadcast",
                LOOPBACK_BROADCAST,
                "--discovery-port",
                str(self.discovery_port),
                *extra,
            ],
            env=python_env(),
            path=str(REPO),
        )

    async def test_server_is_discovered_and_says_bye(self) -> None:
        server = self.start_server()
        announced = self.recorder.next_message(timeout=30)
        match = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        http_port = int(match.group(1))
        message = await announced
        self.assertIsInstance(message, wire.Announce)
        assert isinstance(message, wire.Announce)
        self.assertEqual((message.port, message.scheme), (http_port, "http"))

        out, err, code = await self.discover("--timeout", "1", "--json")
        self.assertEqual(code, 0, err)
        [found] = json.loads(out)
        self.assertEqual(
            (found["address"], found["port"], found["scheme"], found["node_id"], found["legacy"]),
            ("127.0.0.1", http_port, "http", message.node_id.hex(), False),
        )

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{http_port}/api/tags", pool=pool)
        self.assertEqual(response.code, 200)
        tags = json.loads(await response.content())
        self.assertEqual([m["name"] for m in tags["models"]], ["llama3.2:latest"])

        legacy = LegacyClient()
        legacy_port = reactor.listenUDP(0, legacy, interface="127.0.0.1")
        self.addCleanup(legacy_port.stopListening)
        legacy_port.setBroadcastAllowed(True)
        legacy_port.write(b"LANA", (LOOPBACK_BROADCAST, self.discovery_port))
        data, source = await legacy.reply.addTimeout(10, reactor)
        self.assertEqual((data, source[0]), (b"LANA", "127.0.0.1"))

        bye = self.recorder.next_message()
        await server.stop()
        self.assertEqual((server.exit_code, server.exit_signal), (None, signal.SIGTERM))
        self.assertIn("Server Shut Down.", server.output())
        self.assertNotIn("Traceback", server.output())
        self.assertEqual(await bye, wire.Bye(message.node_id))

    async def test_silent_and_503_while_ollama_is_down(self) -> None:
        self.fake.up = False
        server = self.start_server()
        listening = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        await server.wait_for(r"Local Ollama at .* is down: HTTP 500")
        out, err, code = await self.discover("--timeout", "1")
        self.assertEqual((code, out), (1, b"No Ollana server answered within 1 s.\n"))
        url = f"http://127.0.0.1:{listening.group(1)}/api/tags"
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url, pool=pool)
        self.assertEqual(response.code, 503)
        ollama = f"http://127.0.0.1:{self.ollama.getHost().port}"
        self.assertEqual(
            await response.json(),
            {"error": f"ollana: the Ollama behind this server ({ollama}) is down: HTTP 500 "
                      "from /api/version"},
        )  # fmt: skip
        self.fake.up = True
        announced = self.recorder.next_message(timeout=30)
        await server.wait_for(r"Local Ollama at .* is up \(version 0\.12\.3\)")
        self.assertIsInstance(await announced, wire.Announce)
        response = await treq.get(url, pool=pool)
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_ollama_back_is_used_by_the_very_next_request(self) -> None:
        port = self.ollama.getHost().port
        ollama = f"http://127.0.0.1:{port}"
        server = ChildProcess.spawn(
            reactor, self.ollana("server", "--ollama", ollama, "--health-interval", "3600")
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        listening = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        url = f"http://127.0.0.1:{listening.group(1)}/api/tags"
        pool = HTTPConnectionPool(reactor, persistent=False)
        await self.ollama.stopListening()  # Ollama stops: connections are refused
        response = await treq.get(url, pool=pool)
        self.assertEqual(response.code, 502, await response.content())
        self.assertEqual(response.headers.getRawHeaders(b"x-ollana-error"), [b"unreachable"])
        await response.content()
        await server.wait_for(r"Local Ollama at .* is down: ")
        self.ollama = reactor.listenTCP(port, self.fake.site(), interface="127.0.0.1")
        self.addCleanup(self.ollama.stopListening)
        response = await treq.get(url, pool=pool)  # long before the next check (an hour)
        self.assertEqual(response.code, 200)
        await response.content()
        await server.wait_for(r"Local Ollama at .* is up \(it answered a request\)")

    async def test_port_in_use_is_one_clear_line(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = self.start_server(listen=f"tcp:{port}:interface=127.0.0.1")
        code = await server.when_ended()
        self.assertEqual(code, 1)
        [line] = [text for text in server.lines if "Cannot listen" in text]
        self.assertTrue(
            line.endswith(
                f"Cannot listen on TCP port {port} on 127.0.0.1: Address already in use. "
                "Choose another with --listen."
            ),
            line,
        )
        self.assertNotIn("Traceback", server.output())

    async def test_client_process_finds_the_server_process(self) -> None:
        server = self.start_server()
        match = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        client = ChildProcess.spawn(reactor, self.ollana("client"))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(client.stop()))
        found = await client.wait_for(r"Found server (\w+) at (\S+) ")
        self.assertEqual(found.group(2), f"http://127.0.0.1:{match.group(1)}")
        bye = client.wait_for(r"Server \w+ at \S+ said bye")
        await server.stop()
        await bye

    async def test_daemon_writes_and_removes_its_pidfile(self) -> None:
        run = os.path.abspath(self.mktemp())
        os.mkdir(run)
        pidfile, logfile = os.path.join(run, "ollana.pid"), os.path.join(run, "ollana.log")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                *TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "ollana",
                "--mode", "server", "--listen", LOOPBACK_LISTEN,
                "--broadcast", LOOPBACK_BROADCAST, "--discovery-port", str(self.discovery_port),
                "--ollama", f"http://127.0.0.1:{self.ollama.getHost().port}",
            ],  # fmt: skip
            env=python_env(),
            path=run,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(kill_quietly, pid)
        await eventually(reactor, lambda: "Listening for HTTP" in read_text(logfile))
        port = re.search(r"Listening for HTTP on 127\.0\.0\.1:(\d+)", read_text(logfile))
        assert port is not None
        # An answer means the reactor runs, so twistd's SIGTERM handler is in place.
        pool = HTTPConnectionPool(reactor, persistent=False)
        status = await treq.get(f"http://127.0.0.1:{port.group(1)}/ollana/api/status", pool=pool)
        self.assertEqual((await status.json())["mode"], "server")
        os.kill(pid, signal.SIGTERM)
        await eventually(reactor, lambda: not os.path.exists(pidfile) and not process_alive(pid))
        self.assertIn("Server Shut Down.", read_text(logfile))
        self.assertNotIn("Traceback", read_text(logfile))
