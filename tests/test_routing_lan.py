"""Routing on a LAN in memory (tests.support.memnet): client nodes, server nodes and simulated
Ollamas that schedule as Ollama does, on one clock, so that what the strategies do to a
user's time to first token is measured deterministically."""

from __future__ import annotations

import json
import random
import statistics
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollana.simulator import FakeOllama, Scheduling
from ollana.upstream import make_agent
from tests.support.fakes import capture_logs
from tests.support.memnet import Answer, ChatWorkload, ClientNode, MemoryNetwork, ServerNode, ask

MODELS = ["m1:latest", "m2:latest", "m3:latest"]
# Three servers that each hold one model at a time, two slots, 2 s loads; prompts are
# evaluated at 500 tokens/s and answers generated at 50 tokens/s.
SCHEDULING = Scheduling(
    max_loaded=1, num_parallel=2, load_seconds=2.0, prefill_seconds_per_token=0.002,
    token_seconds=0.02,
)  # fmt: skip
# Eight users, four turns each, with skewed popularity, on two devices.
USERS = ["m1"] * 4 + ["m2"] * 3 + ["m3"]


def lan(
    strategy: str, seed: int, servers: int = 3, clients: int = 2
) -> tuple[MemoryNetwork, list[ServerNode], list[ClientNode]]:
    network = MemoryNetwork()
    made = [
        ServerNode(network, f"127.0.0.{11 + i}",
                   FakeOllama(models=MODELS, clock=network, scheduling=SCHEDULING),
                   parallel=SCHEDULING.num_parallel, max_loaded=SCHEDULING.max_loaded)
        for i in range(servers)
    ]  # fmt: skip
    nodes = [
        ClientNode(network, f"127.0.0.{21 + i}", made, strategy, seed=seed + i)
        for i in range(clients)
    ]
    return network, made, nodes


def chats(strategy: str, seed: int) -> list[Answer]:
    network, _, clients = lan(strategy, seed)
    return ChatWorkload(network, clients, USERS, turns=4, seed=seed).run()


def ttfts(answers: list[Answer]) -> list[float]:
    return [answer.ttft for answer in answers if answer.ttft is not None]


class ChatRoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        capture_logs(self)

    def test_ttft_beats_load_blind_strategies_by_half(self) -> None:
        """The issue's workload: mean and median time to first token at most half of the
        better of round-robin and least-connections, with no failed request."""
        results = {name: chats(name, seed=1) for name in ("ttft", "round-robin",
                                                          "least-connections")}  # fmt: skip
        for name, answers in results.items():
            self.assertEqual(len(answers), 32, name)
            self.assertEqual([a for a in answers if not a.ok], [], name)
        mean = {name: statistics.mean(ttfts(a)) for name, a in results.items()}
        median = {name: statistics.median(ttfts(a)) for name, a in results.items()}
        blind = ("round-robin", "least-connections")
        self.assertLessEqual(mean["ttft"], 0.5 * min(mean[n] for n in blind), mean)
        self.assertLessEqual(median["ttft"], 0.5 * min(median[n] for n in blind), median)
        routes = {a.route for a in results["ttft"]}
        self.assertLessEqual({"affinity", "warm"}, routes)

    def test_deterministic(self) -> None:
        first, second = chats("ttft", seed=3), chats("ttft", seed=3)
        self.assertEqual(ttfts(first), ttfts(second))
        self.assertEqual([a.peer for a in first], [a.peer for a in second])


def idle_warm(server: ServerNode, model: str) -> bool:
    """Whether the simulated Ollama behind server could start a request for model now."""
    scheduler = server.fake.scheduler
    runner = scheduler.runners.get(model)
    return (
        runner is not None
        and not runner.loading
        and runner.busy_slots < len(runner.slots)
        and not scheduler.pending
    )


class IdleWarmTests(SynchronousTestCase):
    def setUp(self) -> None:
        capture_logs(self)

    def test_independent_clients_start_on_an_idle_warm_server(self) -> None:
        """Two servers with the model loaded and one slot each, three clients that do not
        see each other's requests: whenever a warm server is idle, a request starts on
        one (at least 90 % of the time)."""
        scheduling = Scheduling(max_loaded=1, num_parallel=1, load_seconds=2.0,
                                prefill_seconds_per_token=0.002, token_seconds=0.02)  # fmt: skip
        network = MemoryNetwork()
        servers = [
            ServerNode(network, f"127.0.0.{11 + i}",
                       FakeOllama(models=MODELS, clock=network, scheduling=scheduling))
            for i in range(2)
        ]  # fmt: skip
        clients = [ClientNode(network, f"127.0.0.{21 + i}", servers, "ttft", seed=i)
                   for i in range(3)]  # fmt: skip
        agent = make_agent(network, connect_timeout=5)
        warming = [ask(network, agent, server.ollama_url + "/api/generate", chat_body(0))
                   for server in servers]  # fmt: skip
        network.run_until(lambda: all(a.ended for a in warming), 30)
        rng = random.Random(7)
        sent: list[tuple[bool, Answer]] = []

        def send(n: int) -> None:
            idle = any(idle_warm(server, "m1:latest") for server in servers)
            client = clients[n % len(clients)]
            sent.append((idle, ask(network, agent, client.url + "/api/generate", chat_body(n))))
            if n < 150:
                network.callLater(rng.uniform(0.05, 0.6), send, n + 1)

        send(1)
        network.run_until(lambda: len(sent) > 150 and all(a.ended for _, a in sent), 300)
        self.assertEqual([(a.status, a.error) for _, a in sent if not a.ok], [])
        records = sorted((r for s in servers for r in s.fake.scheduler.records
                          if r.arrived > 0), key=lambda r: r.arrived)[-len(sent):]  # fmt: skip
        chances = [(idle, record) for (idle, _), record in zip(sent, records, strict=True)
                   if idle]  # fmt: skip
        started = [record for _, record in chances if record.wait == 0 and not record.cold]
        self.assertGreater(len(chances), 50)
        self.assertGreaterEqual(len(started) / len(chances), 0.9, (len(started), len(chances)))


def chat_body(n: int) -> bytes:
    return json.dumps({"model": "m1", "prompt": f"question {n} " + "word " * 20}).encode()


class BusyOllama(Resource):
    """An Ollama that answers every generation with its 503 "server busy" at once."""

    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self.fake = fake.resource()
        self.refused = 0

    def render(self, request: Any) -> bytes:
        if request.method == b"POST":
            self.refused += 1
            request.setResponseCode(503)
            return b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
        return self.fake.getChildWithDefault(b"", request).render(request)


class FailingFastTests(SynchronousTestCase):
    def setUp(self) -> None:
        capture_logs(self)

    def test_a_server_answering_503_at_once_gets_few_requests(self) -> None:
        """A server whose Ollama refuses every request in a few milliseconds must not look
        idle and draw traffic: within 10 s it gets at most 5 % of the requests, and every
        request is answered by the others."""
        network, servers, clients = lan("ttft", seed=1, clients=3)
        busy = BusyOllama(servers[2].fake)
        network.listeners[(servers[2].host, 11434)] = Site(busy, reactor=network)
        agent = make_agent(network, connect_timeout=5)
        rng = random.Random(3)
        sent: list[Answer] = []

        def send(n: int) -> None:
            body = json.dumps({"model": "m1", "prompt": f"hi {n}"}).encode()
            sent.append(ask(network, agent, clients[n % 3].url + "/api/generate", body))
            if network.seconds() < 10:
                network.callLater(rng.uniform(0.02, 0.1), send, n + 1)

        send(0)
        network.run_until(lambda: network.seconds() >= 10 and all(a.ended for a in sent), 60)
        self.assertEqual([(a.status, a.error) for a in sent if not a.ok], [])
        self.assertGreater(len(sent), 100)
        self.assertLessEqual(busy.refused / len(sent), 0.05, (busy.refused, len(sent)))
