"""A LAN in memory: a reactor whose TCP connections join, through twisted.test.iosim, the
listeners registered on it, with time on its own clock. Client nodes, server nodes and
simulated Ollamas run here as they do on sockets, deterministically and at once; ``fetch``
makes one request and runs the network until its answer is in.

As treq.testing does for one Agent and one resource, but for a whole chain: an app's
request to a client-mode ProxySite goes on to a server-mode ProxySite and to the
simulator, all in this process. iosim does not pass backpressure on; tests of flow
control use StringTransport instead.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from ollana.gate import Gate
from ollana.health import AgentGetter, LocalOllamaMonitor, OllamaProbe, PeerHealthChecker
from ollana.listings import MergedListings
from ollana.load import OllamaLoad
from ollana.management import WholeBody
from ollana.origins import OriginPolicy
from ollana.peers import PeerPool
from ollana.proxy import ProxySettings
from ollana.routing import LocalRouter, PoolRouter, take_report
from ollana.simulator import FakeOllama
from ollana.site import ProxySite
from ollana.upstream import make_agent
from tests.support.fakes import capture_logs


class MemoryNetwork(MemoryReactorClock):
    """A reactor for a LAN in memory (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[tuple[str, int], IProtocolFactory] = {}
        self._pumps: list[IOPump] = []
        self._ports = itertools.count(40000)

    def serve(self, host: str, port: int, factory: IProtocolFactory) -> None:
        """Accept connections to host:port with factory."""
        factory.doStart()
        self.listeners[(host, port)] = factory

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        server_factory = self.listeners.get((host, port))
        server_address = IPv4Address("TCP", host, port)
        client_address = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        accepted = server_factory.buildProtocol(client_address) if server_factory else None
        if accepted is None:
            refused = Failure(ConnectionRefusedError(host, port))
            self.callLater(0, factory.clientConnectionFailed, connector, refused)
            return connector
        client = factory.buildProtocol(server_address)
        server_io = FakeTransport(accepted, True, server_address, client_address)
        client_io = FakeTransport(client, False, client_address, server_address)
        accepted.makeConnection(server_io)
        client.makeConnection(client_io)
        self._pumps.append(IOPump(client, accepted, client_io, server_io, False, clock=self))
        return connector

    def flush(self) -> None:
        """Move every byte that can move, until nothing does."""
        moved = True
        while moved:
            moved = False
            for pump in list(self._pumps):
                while pump.pump():
                    moved = True
            self._pumps = [
                p for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)
            ]

    def run_until(self, done: Callable[[], bool], most: float) -> None:
        """Run, from one timer to the next, until done() or most seconds have passed."""
        deadline = self.seconds() + most
        self.flush()
        while not done() and self.seconds() < deadline:
            calls = [call.getTime() for call in self.getDelayedCalls() if call.active()]
            step = min(calls, default=deadline) - self.seconds()
            self.advance(max(0.0, min(step, deadline - self.seconds())))
            self.flush()


class ServerNode:
    """A simulated Ollama and a server-mode Ollana in front of it, on one host."""

    def __init__(
        self, network: MemoryNetwork, host: str, fake: Any, parallel: int = 1, max_loaded: int = 3
    ) -> None:
        self.host = host
        self.fake = fake
        self.ollama_url = f"http://{host}:11434"
        network.serve(host, 11434, fake.site(access_log=False))
        agent = make_agent(network, connect_timeout=5)
        probe = OllamaProbe(AgentGetter(agent), network, self.ollama_url)
        self.monitor = LocalOllamaMonitor(probe, network, interval=5, timeout=3)
        self.load = OllamaLoad(
            probe, network, interval=5, timeout=3, parallel=parallel, max_loaded=max_loaded
        )
        self.load.startService()
        router = LocalRouter(self.ollama_url, self.monitor, self.load)
        settings = ProxySettings(agent, router, network, gate=Gate(open_to_all=False))
        self.site = ProxySite(settings)
        network.serve(host, 11435, self.site)

    @property
    def url(self) -> str:
        return f"http://{self.host}:11435"


class ClientNode:
    """A client-mode Ollana that knows the given servers (as --peer would), on one host."""

    def __init__(
        self,
        network: MemoryNetwork,
        host: str,
        servers: list[ServerNode],
        strategy: str,
        seed: int = 0,
        check_every: float = 5.0,
    ) -> None:
        self.host = host
        self.pool = PeerPool(network, ttl=15)
        for server in servers:
            peer = self.pool.add_static(server.host, 11435)
            self.pool.check_succeeded(peer, 0.001)
            peer.models = frozenset(server.fake.models)
        getter = AgentGetter(make_agent(network, connect_timeout=5))
        checker = PeerHealthChecker(
            self.pool, getter, network, check_every, 3, 3600,
            on_report=lambda peer, headers: take_report(peer, headers, None),
        )  # fmt: skip
        checker.startService()
        listings = MergedListings(self.pool, getter, network, 3)
        self.router = PoolRouter(self.pool, checker, listings, strategy,
                                 rng=random.Random(seed))  # fmt: skip
        agent = make_agent(network, connect_timeout=5)
        gate = Gate(check_host=True, origins=OriginPolicy())
        settings = ProxySettings(agent, self.router, network, gate=gate)
        network.serve(host, 11434, ProxySite(settings))

    @property
    def url(self) -> str:
        return f"http://{self.host}:11434"


class Answer:
    """What became of one app request: times on the network's clock."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.status: int | None = None
        self.peer: str | None = None
        self.route: str | None = None
        self.first_byte: float | None = None
        self.ended: float | None = None
        self.body = b""
        self.error: str | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from the request to the first byte of its answer's body."""
        return None if self.first_byte is None else self.first_byte - self.started

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.ended is not None and self.error is None


def ask(network: MemoryNetwork, agent: Any, url: str, body: bytes) -> Answer:
    """POST body to url (through agent, on the network) and record what comes back."""

    answer = Answer(network.seconds())

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if answer.first_byte is None:
                answer.first_byte = network.seconds()
            answer.body += data

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            answer.ended = network.seconds()
            if not reason.check(ResponseDone):
                answer.error = reason.getErrorMessage()

    def got(response: Any) -> None:
        answer.status = response.code
        answer.peer = (response.headers.getRawHeaders(b"x-ollana-peer") or [b""])[0].decode()
        answer.route = (response.headers.getRawHeaders(b"x-ollana-route") or [b""])[0].decode()
        response.deliverBody(Collect())

    def failed(failure: Failure) -> None:
        answer.ended = network.seconds()
        answer.error = failure.getErrorMessage()

    headers = Headers({b"content-type": [b"application/json"]})
    agent.request(b"POST", url.encode("ascii"), headers, WholeBody(body)).addCallbacks(got, failed)
    return answer


class ChatWorkload:
    """Users in multi-turn chats through client nodes: each user sends a turn, reads the
    answer (think time), and sends the next with the whole conversation so far."""

    def __init__(
        self,
        network: MemoryNetwork,
        clients: list[ClientNode],
        models: list[str],
        turns: int,
        seed: int,
        think: tuple[float, float] = (1.0, 3.0),
        system_words: int = 300,
        question_words: int = 50,
    ) -> None:
        self.network = network
        self.turns = turns
        self.think = think
        self.question_words = question_words
        self._rng = random.Random(seed)
        self._agent = make_agent(network, connect_timeout=5)
        self.answers: list[Answer] = []
        self.users: list[dict[str, Any]] = [
            {
                "model": model,
                "client": clients[n % len(clients)],
                "messages": [{"role": "system", "content": " ".join(
                    f"s{n}w{i}" for i in range(system_words))}],
                "turn": 0,
                "answer": None,
                "next": self._rng.uniform(0, think[1] - think[0]),
            }
            for n, model in enumerate(models)
        ]  # fmt: skip

    def run(self, most: float = 600.0) -> list[Answer]:
        """Play every turn of every user; the answers, in the order they were asked."""
        self._tick()
        self.network.run_until(self.done, most)
        return self.answers

    def done(self) -> bool:
        return all(user["turn"] >= self.turns for user in self.users)

    def _tick(self) -> None:
        now = self.network.seconds()
        for user in self.users:
            answer = user["answer"]
            if answer is not None and answer.ended is not None:
                user["messages"].append({"role": "assistant", "content": "reply " * 20})
                user["turn"] += 1
                user["answer"] = None
                user["next"] = answer.ended + self._rng.uniform(*self.think)
            elif answer is None and user["turn"] < self.turns and now >= user["next"]:
                words = (f"q{user['turn']}w{i}" for i in range(self.question_words))
                user["messages"].append({"role": "user", "content": " ".join(words)})
                body = json.dumps({"model": user["model"], "messages": user["messages"]})
                user["answer"] = ask(self.network, self._agent,
                                     user["client"].url + "/api/chat", body.encode())  # fmt: skip
                self.answers.append(user["answer"])
        if not self.done():
            self.network.callLater(0.1, self._tick)


@dataclass
class Reply:
    """What came back for one request (fetch)."""

    status: int | None = None
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    done: bool = False
    error: str | None = None

    def header(self, name: bytes) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1].decode() if values else None

    @property
    def peer(self) -> str | None:
        return self.header(b"x-ollana-peer")

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        """The body's NDJSON lines."""
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


def fetch(
    network: MemoryNetwork,
    agent: Any,
    method: bytes,
    url: str,
    body: Any = None,
    headers: dict[bytes, bytes] | None = None,
    most: float = 60,
) -> Reply:
    """One request (a body as bytes, or JSON of any other value), run on the network until
    its answer has all come (or most seconds have passed)."""
    reply = Reply()
    raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    sent = Headers({b"content-type": [b"application/json"]})
    for name, value in (headers or {}).items():
        sent.setRawHeaders(name, [value])

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            reply.body += data

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            reply.done = True
            if not reason.check(ResponseDone):
                reply.error = reason.getErrorMessage()

    def got(response: Any) -> None:
        reply.status, reply.headers = response.code, response.headers
        response.deliverBody(Collect())

    def failed(failure: Failure) -> None:
        reply.done, reply.error = True, failure.getErrorMessage()

    producer = WholeBody(raw) if raw is not None else None
    agent.request(method, url.encode("ascii"), sent, producer).addCallbacks(got, failed)
    network.run_until(lambda: reply.done, most)
    return reply


class TwoServersCase(SynchronousTestCase):
    """A client node in front of two server nodes (at A and B, with these models), and
    an agent to ask any of them (call)."""

    A, B = "127.0.0.11", "127.0.0.12"
    a_models = ["alpha:latest"]
    b_models = ["beta:latest"]

    def setUp(self) -> None:
        capture_logs(self)
        self.network = net = MemoryNetwork()  # the clock of every site too
        self.a = ServerNode(net, self.A, FakeOllama(models=self.a_models, clock=net))
        self.b = ServerNode(net, self.B, FakeOllama(models=self.b_models, clock=net))
        self.client = ClientNode(net, "127.0.0.21", [self.a, self.b], "ttft")
        self.agent = make_agent(net, connect_timeout=5)
        net.run_until(lambda: False, 1)  # the first checks

    def call(
        self,
        method: bytes,
        path: str,
        body: Any = None,
        headers: dict[bytes, bytes] | None = None,
        url: str | None = None,
    ) -> Reply:
        """One request to the client (or url), run until its answer has all come."""
        reply = fetch(self.network, self.agent, method, (url or self.client.url) + path, body,
                      headers)  # fmt: skip
        self.assertTrue(reply.done, f"{method!r} {path}: no answer")
        self.assertIsNone(reply.error, f"{method!r} {path}")
        return reply
