"""The proxy over real loopback sockets: a server-mode and a client-mode Ollana in this
process, in front of a fake Ollama, wired by the same makeService as twistd uses.

Discovery is off here (the client is given its server with --peer); the discovery tests
are in test_integration and test_lan.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ollama
import psutil
from twisted.internet import defer, protocol, task, threads
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from ollana.node import OllanaService
from ollana.tap import Options, makeService
from tests.support.fake_ollama import FakeOllama
from tests.support.processes import accepted_connections_closed, free_udp_port

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"


class PatternFile:
    """size bytes of a repeated 1 MiB block, read like a file, without holding them all."""

    def __init__(self, size: int) -> None:
        self.block = hashlib.sha256(b"ollana").digest() * (1 << 15)  # 1 MiB
        self.size = size
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.offset if n < 0 else min(n, self.size - self.offset)
        start = self.offset % len(self.block)
        piece = (self.block[start:] + self.block)[:n]
        self.offset += len(piece)
        return piece

    def digest(self) -> str:
        sha = hashlib.sha256()
        whole, rest = divmod(self.size, len(self.block))
        for _ in range(whole):
            sha.update(self.block)
        sha.update(self.block[:rest])
        return sha.hexdigest()

    def seek(self, offset: int, whence: int = 0) -> None:
        self.offset = {0: offset, 1: self.offset + offset, 2: self.size + offset}[whence]

    def tell(self) -> int:
        return self.offset

    def close(self) -> None:
        pass


class PeakMemory:
    """The most this process's resident memory grew by while it was watched."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.growth = 0
        self.watch = task.LoopingCall(self.sample)
        self.watch.clock = reactor
        self.watch.start(0.01)

    def sample(self) -> None:
        self.growth = max(self.growth, self.process.memory_info().rss - self.start)

    def stop(self) -> None:
        self.sample()
        self.watch.stop()


class RawPeer(protocol.Protocol):
    """One end of a raw TCP connection, or a response body: what a test writes and reads
    byte for byte. ``done`` fires when the connection (or the body) has ended."""

    transport: Any

    def __init__(self, server: RawServer | None = None) -> None:
        self.server = server
        self.data = b""
        self.done: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        return await connectProtocol(endpoint, cls())

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for want, d in list(self._waiting):
            if want in self.data:
                self._waiting.remove((want, d))
                d.callback(None)
        if self.server is not None:
            self.server.seen(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)

    def received(self, want: bytes, timeout: float = 10) -> defer.Deferred[None]:
        """Fires once the bytes received so far contain want."""
        if want in self.data:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((want, d))
        return d.addTimeout(timeout, reactor)


class RawServer(protocol.Factory):
    """Accepts raw connections; ``connection`` fires with the first whose data starts with
    ``prefix`` (others, such as a server's checks of its Ollama, are left unanswered)."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.peers: list[RawPeer] = []
        self.connection: defer.Deferred[RawPeer] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> RawPeer:
        peer = RawPeer(self)
        self.peers.append(peer)
        return peer

    def seen(self, peer: RawPeer) -> None:
        if peer.data.startswith(self.prefix) and not self.connection.called:
            self.connection.callback(peer)

    def close(self) -> None:
        for peer in self.peers:
            peer.transport.loseConnection()


class ProxyLoopbackTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.ports: list[int] = []

        async def settle() -> None:  # runs last: after the services have stopped
            for port in self.ports:
                await accepted_connections_closed(reactor, port)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(settle()))

    async def start(self, *args: str) -> tuple[OllanaService, int]:
        options = Options()
        options.parseOptions(["--no-discovery", "--listen", LOOPBACK, *args])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = await service.getServiceNamed("http").whenListening()
        self.ports.append(port)
        return service, port

    async def setUpChain(self) -> None:
        self.fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        ollama_port = reactor.listenTCP(0, self.fake.site(), interface="127.0.0.1")
        self.addCleanup(ollama_port.stopListening)
        ollama_url = f"http://127.0.0.1:{ollama_port.getHost().port}"
        self.ports.append(ollama_port.getHost().port)
        _, self.server_port = await self.start("--mode", "server", "--ollama", ollama_url)
        _, self.client_port = await self.start(
            "--mode", "client", "--peer", f"127.0.0.1:{self.server_port}"
        )
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def agent_request(self, url: str, producer: Any, method: bytes = b"POST") -> Any:
        """A request with producer's body; None instead of any error."""
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        requested = agent.request(method, url.encode(), Headers(), producer)
        return requested.addErrback(lambda _: None)

    async def raw_chain(self, prefix: bytes) -> tuple[RawServer, int, int]:
        """A raw upstream (answering nothing by itself) behind a server and a client;
        the upstream, and the server's and the client's ports."""
        uploads = RawServer(prefix)
        listening = reactor.listenTCP(0, uploads, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(uploads.close)
        upstream_url = f"http://127.0.0.1:{listening.getHost().port}"
        _, server_port = await self.start("--mode", "server", "--ollama", upstream_url)
        _, client_port = await self.start("--mode", "client", "--peer", f"127.0.0.1:{server_port}")
        return uploads, server_port, client_port

    def url(self, path: str, via: str = "client") -> bytes:
        port = self.client_port if via == "client" else self.server_port
        return f"http://127.0.0.1:{port}{path}".encode()

    async def post(self, path: str, body: Any, via: str = "client") -> Any:
        producer = FileBodyProducer(_bytes_file(json.dumps(body).encode()))
        return await self.agent.request(b"POST", self.url(path, via), Headers(), producer)

    async def test_ndjson_chunks_pass_one_by_one(self) -> None:
        await self.setUpChain()
        self.fake.gated = True
        requested = defer.Deferred.fromCoroutine(
            self.post("/api/generate", {"model": "llama3.2", "prompt": "a b c d"})
        )
        self.fake.release()  # the headers leave with the first chunk, as Ollama's do
        response = await requested
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        self.assertEqual(
            response.headers.getRawHeaders(b"x-ollana-peer"),
            [f"127.0.0.1:{self.server_port}".encode()],
        )
        body = RawPeer()
        response.deliverBody(body)
        for n, word in enumerate("abcd"):
            if n:
                self.fake.release()
            await body.received(f'"response": "{word} "'.encode())
            # Chunk n reached the client while the fake has not yet written chunk n + 1.
            self.assertEqual(self.fake.emitted, n + 1)
        self.fake.release()
        await body.done
        lines = [json.loads(line) for line in body.data.splitlines()]
        self.assertEqual([line["done"] for line in lines], [False] * 4 + [True])

    async def test_client_leaving_stops_the_generation_upstream(self) -> None:
        await self.setUpChain()
        self.fake.gated = True
        requested = defer.Deferred.fromCoroutine(
            self.post("/api/chat", {"model": "llama3.2", "messages": [{"content": "a b c d e"}]})
        )
        self.fake.release()
        response = await requested
        body = RawPeer()
        response.deliverBody(body)
        await body.received(b'"content": "a "')
        transport: Any = body.transport
        transport.stopProducing()
        # Both hops drop their upstream connection, so the fake sees its client go.
        for _ in range(250):
            if self.fake.abandoned:
                break
            await task.deferLater(reactor, 0.02)
        self.assertEqual(self.fake.abandoned, 1)
        self.assertEqual(self.fake.emitted, 1)

    async def test_sse_stream(self) -> None:
        await self.setUpChain()
        response = await self.post(
            "/v1/chat/completions",
            {
                "model": "llama3.2",
                "stream": True,
                "messages": [{"role": "user", "content": "hi there"}],
            },
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = await readBody(response)
        events = [e for e in body.split(b"\n\n") if e]
        self.assertEqual(len(events), 4)  # two words, the finish_reason chunk, [DONE]
        self.assertEqual(events[-1], b"data: [DONE]")
        self.assertEqual(json.loads(events[0][6:])["choices"][0]["delta"]["content"], "hi ")

    async def test_blob_upload_of_256_mib(self) -> None:
        await self.setUpChain()
        body = PatternFile(256 << 20)
        digest = body.digest()
        producer = FileBodyProducer(body, readSize=1 << 16)
        memory = PeakMemory()
        response = await self.agent.request(
            b"POST", self.url(f"/api/blobs/sha256:{digest}"), Headers(), producer
        )
        memory.stop()
        self.assertEqual(response.code, 201, await readBody(response))
        # Both hops, the client and the fake (which spools to disk) share this process:
        # had any hop kept the body, it would have grown by the body's size.
        print(f"\nmemory growth during the upload: {memory.growth / 2**20:.1f} MiB")
        self.assertLess(memory.growth, 64 << 20)
        self.assertIn(digest, self.fake.blobs)
        head = await self.agent.request(b"HEAD", self.url(f"/api/blobs/sha256:{digest}"))
        self.assertEqual(head.code, 200)

    async def test_head_and_options(self) -> None:
        await self.setUpChain()
        head = await self.agent.request(b"HEAD", self.url("/api/version", via="server"))
        self.assertEqual(head.code, 200)
        length = int(head.headers.getRawHeaders(b"content-length")[0])
        get = await self.agent.request(b"GET", self.url("/api/version", via="server"))
        self.assertEqual(len(await readBody(get)), length)
        self.assertEqual(await readBody(head), b"")
        options = await self.agent.request(b"OPTIONS", self.url("/api/tags"))
        self.assertEqual(options.code, 204)
        self.assertEqual(
            options.headers.getRawHeaders(b"allow"), [b"GET, HEAD, POST, DELETE, OPTIONS"]
        )
        self.assertEqual(self.fake.requests[-1], ("OPTIONS", "/api/tags"))

    async def test_upstream_headers_seen_by_ollama(self) -> None:
        await self.setUpChain()
        await readBody(await self.agent.request(b"GET", self.url("/api/nothing?x=1")))
        [headers] = [h for (_, path), h in zip(self.fake.requests, self.fake.headers, strict=True)
                     if path == "/api/nothing"]  # fmt: skip
        self.assertEqual(headers.getRawHeaders(b"via"), [b"1.1 ollana", b"1.1 ollana"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1, 127.0.0.1"])

    async def test_refused_peer_is_502(self) -> None:
        _, port = await self.start("--mode", "client", "--peer", "127.0.0.1:9")
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{port}/api/tags".encode())
        self.assertEqual(response.code, 502)
        self.assertIn(b"connection refused", await readBody(response))

    async def test_no_server_found_is_503(self) -> None:
        options = Options()
        options.parseOptions(
            ["--mode", "client", "--listen", LOOPBACK, "--broadcast", "127.255.255.255",
             "--discovery-port", str(free_udp_port())]
        )  # fmt: skip
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = await service.getServiceNamed("http").whenListening()
        self.ports.append(port)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/api/tags".encode())
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertEqual(
            json.loads(await readBody(response)),
            {"error": "ollana: no Ollama server found on the LAN yet"},
        )

    async def test_upload_streams_through_both_hops(self) -> None:
        # A raw upstream shows what has arrived while the client is still sending.
        uploads, _, client_port = await self.raw_chain(b"POST ")
        first, second = b"1" * (1 << 20), b"2" * (1 << 20)
        app = await RawPeer.connect(client_port)
        self.addCleanup(app.transport.loseConnection)
        app.transport.write(
            b"POST /api/blobs/sha256:00 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n" % (2 << 20) + first
        )
        upstream = await uploads.connection.addTimeout(10, reactor)
        await upstream.received(first)
        self.assertEqual(upstream.data.partition(b"\r\n\r\n")[2], first, "not yet the rest")
        app.transport.write(second)
        await upstream.received(second)
        upstream.transport.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await app.received(b"\r\n\r\n")
        self.assertTrue(app.data.startswith(b"HTTP/1.1 201 Created\r\n"), app.data)
        self.assertTrue(upstream.data.endswith(b"\r\n\r\n" + first + second))

    async def test_upload_to_a_stalled_upstream_is_held_in_bounded_memory(self) -> None:
        uploads, _, client_port = await self.raw_chain(b"POST ")
        body = PatternFile(128 << 20)
        memory = PeakMemory()
        requested = self.agent_request(
            f"http://127.0.0.1:{client_port}/api/blobs/sha256:{body.digest()}",
            FileBodyProducer(body, readSize=1 << 16),
        )
        upstream = await uploads.connection.addTimeout(10, reactor)
        upstream.transport.pauseProducing()  # Ollama stops reading
        await task.deferLater(reactor, 1)  # time enough to read it all, were nothing held
        memory.stop()
        print(f"\nsent {body.offset / 2**20:.1f} MiB, memory grew {memory.growth / 2**20:.1f} MiB")
        # Only socket buffers are in flight: nothing in the chain reads on.
        self.assertLess(body.offset, 32 << 20)
        self.assertLess(memory.growth, 32 << 20)
        requested.cancel()  # the uploader gives up: both hops let go of the upstream
        upstream.transport.resumeProducing()
        await upstream.done.addTimeout(10, reactor)

    async def test_an_early_answer_closes_the_upstream_connection(self) -> None:
        uploads = RawServer(b"PUT ")
        listening = reactor.listenTCP(0, uploads, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(uploads.close)
        upstream_url = f"http://127.0.0.1:{listening.getHost().port}"
        _, server_port = await self.start("--mode", "server", "--ollama", upstream_url)
        body = PatternFile(64 << 20)
        requested = self.agent_request(
            f"http://127.0.0.1:{server_port}/api/blobs/sha256:00",
            FileBodyProducer(body, readSize=1 << 16),
            method=b"PUT",
        )
        upstream = await uploads.connection.addTimeout(10, reactor)
        upstream.transport.pauseProducing()  # reads no more of the body...
        await task.deferLater(reactor, 0.5)  # (the proxy's send buffer fills meanwhile)
        upstream.transport.write(  # ...and answers
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 2\r\n\r\nno"
        )
        response = await requested
        self.assertEqual(response.code, 413)
        self.assertEqual(await readBody(response), b"no")
        self.assertEqual(body.offset, body.size, "the client could send it all (dropped)")
        upstream.transport.resumeProducing()
        await upstream.done.addTimeout(10, reactor)  # the proxy let go of that connection

    async def test_expect_100_continue(self) -> None:
        await self.setUpChain()
        body = b"curl uploads big files like this"
        digest = hashlib.sha256(body).hexdigest()
        app = await RawPeer.connect(self.client_port)
        self.addCleanup(app.transport.loseConnection)
        app.transport.write(
            b"POST /api/blobs/sha256:%s HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (digest.encode(), len(body))
        )
        await app.received(b"HTTP/1.1 100 Continue\r\n\r\n")
        app.transport.write(body)
        await app.received(b"HTTP/1.1 201 Created\r\n")
        self.assertIn(digest, self.fake.blobs)

    async def test_official_ollama_client(self) -> None:
        await self.setUpChain()
        host = f"http://127.0.0.1:{self.client_port}"

        def use_client() -> dict[str, Any]:
            with ollama.Client(host=host) as client:  # kept-alive connections, then closed
                messages = [{"role": "user", "content": "why is the sky blue"}]
                streamed = "".join(
                    part["message"]["content"]
                    for part in client.chat(model="llama3.2", messages=messages, stream=True)
                )
                return {
                    "chat": client.chat(model="llama3.2", messages=messages)["message"]["content"],
                    "streamed": streamed,
                    "generate": client.generate(model="llama3.2", prompt="hello")["response"],
                    "list": [m.model for m in client.list().models],
                    "embed": client.embed(model="llama3.2", input=["a", "bb"])["embeddings"],
                }

        results = await threads.deferToThread(use_client)
        await accepted_connections_closed(reactor, self.client_port)
        self.assertEqual(results["chat"], "why is the sky blue ")
        self.assertEqual(results["streamed"], "why is the sky blue ")
        self.assertEqual(results["generate"], "hello ")
        self.assertEqual(results["list"], ["llama3.2:latest"])
        self.assertEqual(results["embed"], [[1.0, 0.5, -0.5], [2.0, 0.5, -0.5]])

    async def test_a_source_over_its_cap_is_answered_busy(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        ollama_port = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")
        self.addCleanup(ollama_port.stopListening)
        ollama_url = f"http://127.0.0.1:{ollama_port.getHost().port}"
        _, port = await self.start(
            "--mode", "server", "--ollama", ollama_url, "--max-connections", "1"
        )
        held = await RawPeer.connect(port)  # this source's one connection
        url = f"http://127.0.0.1:{port}/api/chat".encode()
        # The rest of a body sent after the head is read (dropped), so no reset loses the answer.
        body = FileBodyProducer(_bytes_file(b"{" + b" " * (32 << 10) + b"}"))
        response = await self.agent_request(url.decode(), body)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"x-ollana-error"), [b"busy"])
        self.assertIn(
            "has 1 connections open, the most it may", json.loads(await readBody(response))["error"]
        )
        held.transport.loseConnection()
        await held.done
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/api/tags".encode())
        self.assertEqual(response.code, 200)
        await readBody(response)


def _bytes_file(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
