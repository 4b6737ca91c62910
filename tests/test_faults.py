"""Faults that should cost nothing, played against real twistd ollana processes on loopback
(discovery off): many streams through one client to one server, and a server whose answers
never end their head. ``python -m bench.faults`` measures these and more (memory, stalls,
floods, a killed Ollama); the unit tests of the limits are in test_httpclient, test_site
and test_health.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import treq
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support.processes import ChildProcess, accepted_connections_closed, free_tcp_port

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
LISTENING = r"Listening for HTTP on 127\.0\.0\.1:(\d+)"
STREAMS = 300  # more than a client's connections to one server (192), and a server's
# connections per source (256): the 257th was once closed unanswered, and counted as a
# failure of the server
WORDS = 20  # chunks of each stream, 0.05 s apart: a second each, so they overlap
FILLER = (b"X-Filler: " + b"a" * 54 + b"\r\n") * 1024
PROMPT = 5.0  # seconds within which an endless head is answered (head limit: 64 kB)


class EndlessHead(protocol.Protocol):
    """A hostile Ollana server: GET /api/version answered as Ollama would (its health
    checks pass), any other request with a status line, then header lines for as long as
    they are read (a push producer: written only as fast as the client reads)."""

    transport: Any

    def connectionMade(self) -> None:
        self.buffer = b""
        self.endless = False
        self.paused = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.endless and b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if head.split(b" ")[1:2] == [b"/api/version"]:
                self.transport.write(
                    b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"version":"0.12.0"}'
                )
            else:
                self.endless = True
                self.transport.registerProducer(self, True)
                self.transport.write(b"HTTP/1.1 200 OK\r\n")
                self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.connected:
            self.transport.write(FILLER)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class FaultTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def node(self, *args: str) -> tuple[ChildProcess, int]:
        """A twistd ollana process on 127.0.0.1, discovery off; it and its HTTP port."""
        child = ChildProcess.spawn(
            reactor,
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "ollana",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--no-discovery",
                "--drain-timeout",
                "1",
                *args,
            ],
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        listening = await child.wait_for(LISTENING)
        return child, int(listening.group(1))

    async def client_of(self, server: int) -> tuple[ChildProcess, int]:
        """A client-mode node with server as --peer, once it sees it healthy."""
        client, port = await self.node(
            "--mode", "client", "--health-interval", "1", "--peer", f"127.0.0.1:{server}"
        )
        for _ in range(100):
            answer = await treq.get(f"http://127.0.0.1:{port}/ollana/api/status", pool=self.pool)
            peers = (await answer.json())["peers"]
            if peers and all(peer["healthy"] for peer in peers):
                return client, port
            await task.deferLater(reactor, 0.1)
        raise AssertionError("the client did not see its server healthy within 10 s")

    async def generate(self, port: int, words: int) -> tuple[int, bytes, Any]:
        """POST /api/generate of a prompt of words words: status, body, headers."""
        body = json.dumps({"model": "echo", "prompt": " ".join(["word"] * words)})
        url = f"http://127.0.0.1:{port}/api/generate"
        response = await treq.post(url, data=body.encode(), pool=self.pool)
        return response.code, await response.content(), response.headers

    async def test_300_streams_through_one_client_to_one_server_are_whole(self) -> None:
        ollama = free_tcp_port()
        simulator = ChildProcess.spawn(
            reactor, ["-m", "ollana.simulator", "--port", str(ollama), "--pace", "0.05"]
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(simulator.stop()))
        await simulator.wait_for(r"on http://127\.0\.0\.1:\d+")
        _, server = await self.node("--mode", "server", "--ollama", f"http://127.0.0.1:{ollama}")
        client, port = await self.client_of(server)

        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.generate(port, WORDS)) for _ in range(STREAMS)]
        )

        self.assertEqual(Counter(status for status, _, _ in results), {200: STREAMS})
        for _, body, _ in results:
            lines = [json.loads(line) for line in body.splitlines()]
            self.assertEqual(len(lines), WORDS + 1)
            self.assertEqual(lines[-1]["done"], True)
            self.assertEqual("".join(line["response"] for line in lines), "word " * WORDS)
        self.assertNotIn("Traceback", client.output())

    async def endless_peer(self) -> tuple[ChildProcess, int]:
        """A client whose one server is EndlessHead."""
        factory = protocol.Factory.forProtocol(EndlessHead)
        hostile = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = hostile.getHost().port
        # Clean-ups run last first: the client stops, then this port, then its connections.
        self.addCleanup(
            lambda: defer.Deferred.fromCoroutine(accepted_connections_closed(reactor, port))
        )
        self.addCleanup(hostile.stopListening)
        return await self.client_of(port)

    async def test_endless_headers_give_a_prompt_502(self) -> None:
        client, port = await self.endless_peer()
        generating = defer.Deferred.fromCoroutine(self.generate(port, 3))
        status, body, headers = await generating.addTimeout(PROMPT, reactor)
        self.assertEqual(status, 502)
        self.assertEqual(headers.getRawHeaders(b"x-ollana-error"), [b"unreachable"])
        self.assertIn("response head larger than 65536 bytes", json.loads(body)["error"])
        answer = await treq.get(f"http://127.0.0.1:{port}/ollana/api/status", pool=self.pool)
        self.assertEqual(answer.code, 200)  # still serving
        await answer.content()
        self.assertFalse(client.has_ended)

    async def test_endless_headers_give_a_merged_listing_a_prompt_5xx(self) -> None:
        _, port = await self.endless_peer()
        asked = treq.get(f"http://127.0.0.1:{port}/api/tags", pool=self.pool)
        answer = await asked.addTimeout(PROMPT, reactor)
        await answer.content()
        self.assertEqual(answer.code, 502)
