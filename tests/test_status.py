"""Ollana's own pages under /ollana/ (the JSON status, the Prometheus metrics and the
dashboard) over real loopback sockets: server- and client-mode nodes in this process,
wired by the same makeService as twistd uses, in front of fake Ollamas.

Discovery, where a test uses it, goes to 127.255.255.255 on a free port. The dashboard is
also loaded in a headless Chromium, when there is one (see ``browser``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from html.parser import HTMLParser
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.template import flattenString
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ollana import __version__
from ollana.config import Settings
from ollana.health import OllamaUnavailable
from ollana.interfaces import JSON, INodeStatus, JSONObject
from ollana.load import environment_limits
from ollana.node import OllanaService
from ollana.simulator import FOREVER, Scheduling
from ollana.state import ServerState
from ollana.status import CSS, DashboardPage, duration, full_status, state_status
from ollana.tap import Options, makeService
from tests.support.fake_ollama import FakeOllama
from tests.support.fakes import FakeNetworkReactor, FakeServers
from tests.support.processes import accepted_connections_closed, eventually, free_udp_port

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"
LOOPBACK_BROADCAST = "127.255.255.255"
REFUSED = "127.0.0.1:9"  # nothing listens there: a server that is down
# Markup in a model name (models come from the servers): text on the page, never elements.
# (No alert() in it: were it run, a dialog would hang the headless browser.)
HOSTILE = "<script>document.title=1</script><img src=x onerror=document.title=2>"
QUICK = ["--health-interval", "0.2", "--unhealthy-after", "1"]


class Page(HTMLParser):
    """What a person sees of an HTML page: the heading, the dt/dd pairs, the table rows
    (column label to cell text), the visible text; plus every element's tag and the
    meta tags."""

    CAPTURED = ("title", "h1", "dt", "dd", "td")

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[str] = []
        self.meta: list[dict[str, str]] = []
        self.title = self.h1 = ""
        self.pairs: list[tuple[str, str]] = []
        self.rows: list[dict[str, str]] = []
        self.text = ""
        self._open: list[tuple[str, str, list[str]]] = []  # tag, data-label, text so far
        self._hidden = 0  # inside head, style or script
        self._dt = ""
        self.feed(html)
        self.close()
        self.rows = [row for row in self.rows if row]  # not the header's
        self.text = " ".join(self.text.split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append(tag)
        if tag == "meta":
            self.meta.append(attributes)
        if tag in ("head", "style", "script"):
            self._hidden += 1
        if tag == "tr":
            self.rows.append({})
        if tag in self.CAPTURED:
            self._open.append((tag, attributes.get("data-label", ""), []))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "script"):
            self._hidden -= 1
        if tag not in self.CAPTURED or not self._open or self._open[-1][0] != tag:
            return
        _, label, parts = self._open.pop()
        text = " ".join("".join(parts).split())
        if tag in ("title", "h1"):
            setattr(self, tag, text)
        elif tag == "dt":
            self._dt = text
        elif tag == "dd":
            self.pairs.append((self._dt, text))
        elif tag == "td" and self.rows:
            self.rows[-1][label] = text

    def handle_data(self, data: str) -> None:
        for _, _, parts in self._open:
            parts.append(data)
        if not self._hidden or self._open:
            self.text += " " + data

    def field(self, name: str) -> str:
        """The first dd under a dt of this name."""
        return next(value for key, value in self.pairs if key == name)

    def row(self, server: str) -> dict[str, str]:
        """The table row of this server (host:port)."""
        rows = [row for row in self.rows if row.get("Server") == server]
        assert rows, f"no row for {server} in {self.rows}"
        return rows[0]


class Browser(ProcessProtocol):
    """A headless Chromium run: its output, and when it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def browser() -> str:
    """Debian's chromium; skips the test without one, unless OLLANA_REQUIRE_BROWSER is set."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("OLLANA_REQUIRE_BROWSER"):
        raise AssertionError("OLLANA_REQUIRE_BROWSER is set but chromium is not installed")
    raise SkipTest("chromium is not installed (apt-get install chromium); "
                   "set OLLANA_REQUIRE_BROWSER=1 to make that a failure")  # fmt: skip


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text as {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Nodes(TestCase):
    """Starts nodes and fake Ollamas on loopback, and stops them after the test."""

    timeout = 60

    def setUp(self) -> None:
        self.ports: list[int] = []
        self.fakes: list[FakeOllama] = []
        self.nodes: list[OllanaService] = []
        self.listening: list[Any] = []
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.stop_all()))

    async def stop_all(self) -> None:
        """Stop the nodes once nothing is under way, then the fakes; wait for every
        connection to close."""
        # A request still under way when its node stops would put its upstream connection
        # back in a pool already closed: stop the checks, let the requests end.
        for node in self.nodes:
            for name in ("health", "ollama-monitor"):
                if name in {service.name for service in node}:
                    await defer.maybeDeferred(node.getServiceNamed(name).stopService)
        try:
            await until(lambda: not any(map(in_flight, self.nodes)), "the requests to end", 5)
        finally:  # stop them anyway
            for node in reversed(self.nodes):
                await defer.maybeDeferred(node.stopService)
        for listening in self.listening:
            await defer.maybeDeferred(listening.stopListening)
        for port in self.ports:
            await accepted_connections_closed(reactor, port)

    def ollama(
        self, models: list[str], scheduling: Scheduling | None = None
    ) -> tuple[FakeOllama, str]:
        """A fake Ollama on loopback (scheduling as Ollama does, if given), and its URL."""
        fake = FakeOllama(models=models, clock=reactor, scheduling=scheduling)
        listening = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")
        self.listening.append(listening)
        self.ports.append(listening.getHost().port)
        self.fakes.append(fake)
        return fake, f"http://127.0.0.1:{listening.getHost().port}"

    async def start(self, *args: str, discovery: int | None = None) -> tuple[OllanaService, int]:
        """A node with these options, discovery on loopback at that UDP port or none."""
        found = (["--broadcast", LOOPBACK_BROADCAST, "--discovery-port", str(discovery)]
                 if discovery is not None else ["--no-discovery"])  # fmt: skip
        options = Options()
        options.parseOptions([*found, "--listen", LOOPBACK, *args])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.nodes.append(service)
        port = await service.whenListening()
        self.ports.append(port)
        return service, port

    async def request(
        self, port: int, path: str, method: bytes = b"GET", body: bytes | None = None
    ) -> tuple[IResponse, bytes]:
        """A request to a node on loopback: the response and its whole body."""
        producer = None if body is None else FileBodyProducer(_bytes_file(body))
        url = f"http://127.0.0.1:{port}{path}".encode()
        response = await self.agent.request(method, url, Headers(), producer)
        return response, await readBody(response)

    async def status(self, port: int) -> dict[str, Any]:
        """/ollana/api/status of the node on that port."""
        response, body = await self.request(port, "/ollana/api/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"]
        )
        result: dict[str, Any] = json.loads(body)
        return result

    async def metrics(self, port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """/ollana/metrics of the node on that port, parsed."""
        response, body = await self.request(port, "/ollana/metrics")
        self.assertEqual(response.code, 200)
        return metric_samples(body.decode("utf-8"))

    def no_own_pages_upstream(self) -> None:
        """No fake Ollama was asked for anything under /ollana."""
        for fake in self.fakes:
            self.assertEqual([r for r in fake.requests if r[1].startswith("/ollana")], [])


def until(check: Callable[[], bool], what: str, deadline: float = 10) -> Any:
    """Wait until check() is true (polling every 50 ms)."""
    return eventually(reactor, check, deadline, 0.05, what)


def in_flight(node: OllanaService) -> float:
    """The requests a node is proxying at the moment."""
    return node.observed.metrics.registry.get_sample_value("ollana_requests_in_flight") or 0.0


def peers_of(service: OllanaService) -> dict[str, dict[str, Any]]:
    """The node's servers as its status shows them, by host:port."""
    return {f"{p['address']}:{p['port']}": p for p in service.status()["peers"]}


class StatusJSONTests(Nodes):
    async def test_server_mode(self) -> None:
        fake, url = self.ollama(["llama3.2:latest"])
        server, port = await self.start("--mode", "server", "--ollama", url, *QUICK)
        await until(lambda: server.status()["ollama"]["healthy"], "the Ollama checked")
        status = await self.status(port)
        self.assertEqual(status["mode"], "server")
        self.assertEqual(status["node_id"], server.settings.node_id.hex())
        self.assertEqual(len(status["node_id"]), 32)
        self.assertEqual(status["version"], __version__)
        self.assertEqual(status["listen"], f"127.0.0.1:{port}")
        self.assertGreaterEqual(status["uptime_s"], 0)
        self.assertEqual(
            status["ollama"],
            {"url": url, "healthy": True, "version": "0.12.0", "reason": "answering"},
        )
        self.assertEqual(status["peers"], [])
        # Its load: nothing loaded (the fake schedules nothing), no request under way.
        parallel, max_queue, max_loaded = environment_limits()
        self.assertEqual(
            status["state"],
            {"parallel": parallel, "max_queue": max_queue, "max_loaded": max_loaded,
             "loaded": [], "models": {}, "slots_busy": 0, "slots_free": 0, "queue": 0},
        )  # fmt: skip
        # Its Ollama's models, as its /api/tags lists them.
        [model] = status["models"]
        self.assertEqual((model["name"], model["size"]), ("llama3.2:latest", 1000))
        self.assertEqual(sorted(model), ["digest", "modified_at", "name", "size"])

        fake.up = False
        await until(lambda: not server.status()["ollama"]["healthy"], "the Ollama down")
        down = await self.status(port)
        ollama = down["ollama"]
        self.assertFalse(ollama["healthy"])
        self.assertIn("500", ollama["reason"])
        self.assertIsNone(down["models"], "the Ollama could not say")
        self.no_own_pages_upstream()

    async def test_client_mode_lists_discovered_and_static_servers(self) -> None:
        discovery = free_udp_port()
        _, found_url = self.ollama(["llama3.2:latest"])
        _, given_url = self.ollama(["qwen3:8b", "llama3.2:latest"])
        found, found_port = await self.start(
            "--mode", "server", "--ollama", found_url, *QUICK, discovery=discovery
        )
        _, given_port = await self.start("--mode", "server", "--ollama", given_url, *QUICK)
        client, port = await self.start(
            "--mode", "client", "--peer", f"127.0.0.1:{given_port}", "--probe-interval", "1",
            *QUICK, discovery=discovery,
        )  # fmt: skip
        found_at, given_at = f"127.0.0.1:{found_port}", f"127.0.0.1:{given_port}"

        def checked() -> bool:
            peers = peers_of(client)
            return {found_at, given_at} <= set(peers) and all(
                p["latency_ms"] is not None and p["models"] for p in peers.values()
            )

        await until(checked, "both servers found and checked")
        response, _ = await self.request(
            port,
            "/api/generate",
            b"POST",
            json.dumps({"model": "qwen3:8b", "stream": False}).encode(),
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-ollana-peer"), [given_at.encode()])

        status = await self.status(port)
        self.assertEqual(status["mode"], "client")
        self.assertIsNone(status["ollama"])
        self.assertIsNone(status["state"])
        peers = {f"{p['address']}:{p['port']}": p for p in status["peers"]}
        self.assertEqual(set(peers), {found_at, given_at})
        for peer in peers.values():
            self.assertEqual(
                set(peer),
                {"id", "address", "port", "scheme", "source", "healthy", "reason", "latency_ms",
                 "active_requests", "total_requests", "failures", "models", "last_seen",
                 "last_seen_s_ago", "state", "unreported"},
            )  # fmt: skip
            # Each reported its load with the answers to health checks.
            self.assertEqual(
                set(peer["state"]),
                {"parallel", "max_queue", "max_loaded", "loaded", "models", "slots_busy",
                 "slots_free", "queue"},
            )  # fmt: skip
            self.assertIsInstance(peer["unreported"], int)
            self.assertEqual((peer["address"], peer["scheme"]), ("127.0.0.1", "http"))
            self.assertIs(peer["healthy"], True)
            self.assertEqual(
                (peer["reason"], peer["failures"], peer["active_requests"]), ("", 0, 0)
            )
            self.assertIsInstance(peer["latency_ms"], float)
            self.assertGreaterEqual(peer["latency_ms"], 0)
            self.assertLess(
                abs(datetime.fromisoformat(peer["last_seen"]).timestamp() - time.time()), 60
            )
            self.assertGreaterEqual(peer["last_seen_s_ago"], 0)
        discovered, static = peers[found_at], peers[given_at]
        self.assertEqual(discovered["source"], "discovered")
        self.assertEqual(discovered["id"], found.settings.node_id.hex())
        self.assertEqual(discovered["port"], found_port)
        self.assertEqual(discovered["models"], ["llama3.2:latest"])
        self.assertEqual(discovered["total_requests"], 0)
        self.assertEqual(static["source"], "static")
        self.assertEqual(static["id"], f"static:127.0.0.1:{given_port}")
        self.assertEqual(static["port"], given_port)
        self.assertEqual(static["models"], ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(static["total_requests"], 1)
        self.no_own_pages_upstream()

    async def test_own_pages_are_answered_here(self) -> None:
        _, url = self.ollama(["llama3.2:latest"])
        _, server_port = await self.start("--mode", "server", "--ollama", url, *QUICK)
        client, port = await self.start("--mode", "client", "--peer", f"127.0.0.1:{server_port}")
        await until(lambda: bool(peers_of(client)), "the server known")
        for node in (port, server_port):
            for path, code in [("/ollana", 302), ("/ollana/", 200), ("/ollana/api/status", 200),
                               ("/ollana/metrics", 200), ("/ollana/nothing", 404),
                               ("/ollana/?x=1", 200)]:  # fmt: skip
                response, _ = await self.request(node, path)
                self.assertEqual(response.code, code, path)
                self.assertFalse(response.headers.hasHeader(b"x-ollana-peer"), path)
        response, _ = await self.request(port, "/ollana")
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/ollana/"])
        self.assertEqual((await self.status(port))["mode"], "client")  # not the server's
        # Nothing was counted as a proxied request either.
        proxied = [key for key in await self.metrics(port) if key[0] == "ollana_requests_total"]
        self.assertEqual(proxied, [])
        self.no_own_pages_upstream()


class LoadTests(Nodes):
    """A server's load as it and its clients show it: JSON, page and metrics."""

    async def test_requests_held_at_a_scheduling_ollama(self) -> None:
        scheduling = Scheduling(num_parallel=2, load_seconds=0.0, prefill_seconds_per_token=0.0,
                                keep_alive=FOREVER)  # no expiry left behind  # fmt: skip
        fake, url = self.ollama(["llama3.2:latest"], scheduling)
        fake.gated = True  # every token waits for fake.release()
        server, server_port = await self.start(
            "--mode", "server", "--ollama", url, "--ollama-parallel", "2",
            "--ollama-max-queue", "7", "--ollama-max-loaded", "1", *QUICK,
        )  # fmt: skip
        server_at = f"127.0.0.1:{server_port}"
        client, port = await self.start("--mode", "client", "--peer", server_at, *QUICK)
        await until(lambda: bool(peers_of(client).get(server_at, {}).get("state")), "a report")
        body = json.dumps({"model": "llama3.2", "prompt": "a b"}).encode()
        held = [defer.Deferred.fromCoroutine(self.request(port, "/api/generate", b"POST", body))
                for _ in range(3)]  # fmt: skip

        def llama(state: dict[str, Any] | None) -> dict[str, int]:
            return (state or {}).get("models", {}).get("llama3.2:latest", {})

        def held_there() -> bool:
            state = server.status()["state"]
            return llama(state).get("in_flight") == 3 and state["loaded"] == ["llama3.2:latest"]

        await until(held_there, "three requests at the server, the model loaded")
        # Two run in the model's two slots, one waits for a slot; none has its first byte.
        # (Requests that name no model, the client's health checks, count in neither.)
        expected = {"parallel": 2, "max_queue": 7, "max_loaded": 1, "loaded": ["llama3.2:latest"],
                    "slots_busy": 2, "slots_free": 0, "queue": 1}  # fmt: skip
        state = (await self.status(server_port))["state"]
        self.assertEqual(llama(state), {"in_flight": 3, "waiting": 3})
        self.assertEqual({key: state[key] for key in expected}, expected)

        _, html = await self.request(server_port, "/ollana/")
        page = Page(html.decode("utf-8"))
        self.assertEqual(page.field("Loaded models"), "llama3.2:latest (at most 1)")
        self.assertEqual(page.field("Slots"), "2 busy, 0 free (2 per model)")
        self.assertEqual(page.field("Queue"), "1 (Ollama queues up to 7)")
        self.assertIn("llama3.2:latest: 3 in flight, 3 waiting", page.field("Requests"))

        samples = await self.metrics(server_port)
        for kind in ("in_flight", "waiting"):
            labels = frozenset({("model", "llama3.2:latest"), ("state", kind)})
            self.assertEqual(samples[("ollana_ollama_requests", labels)], 3, kind)
        self.assertEqual(samples[("ollana_ollama_loaded_models", frozenset())], 1)

        # The client shows the report its health checks brought.
        await until(lambda: llama(peers_of(client)[server_at]["state"]).get("in_flight") == 3,
                    "the client told")  # fmt: skip
        peer = (await self.status(port))["peers"][0]
        self.assertEqual({key: peer["state"][key] for key in expected}, expected)
        self.assertEqual(peer["unreported"], 0)  # that report came after the requests
        _, html = await self.request(port, "/ollana/")
        row = Page(html.decode("utf-8")).row(server_at)
        self.assertEqual((row["Loaded"], row["Slots"], row["Queue"]),
                         ("llama3.2:latest", "2 busy, 0 free", "1"))  # fmt: skip
        client_metrics = await self.metrics(port)
        self.assertFalse([name for name, _ in client_metrics if "ollana_ollama_" in name])

        fake.release(1000)
        for request in held:
            response, _ = await request
            self.assertEqual(response.code, 200)

        def idle(state: dict[str, Any] | None) -> bool:
            return state is not None and (state["slots_busy"], state["queue"]) == (0, 0)

        await until(lambda: idle(server.status()["state"]), "the server idle")
        await until(lambda: idle(peers_of(client)[server_at]["state"]), "the client told")
        self.assertEqual(server.status()["state"]["slots_free"], 2)


class MetricsTests(Nodes):
    async def test_counts_after_requests_through_a_chain(self) -> None:
        discovery = free_udp_port()
        fake, url = self.ollama(["llama3.2:latest"])
        _, server_port = await self.start(
            "--mode", "server", "--ollama", url, *QUICK, discovery=discovery
        )
        client, port = await self.start(
            "--mode", "client", "--peer", REFUSED, "--probe-interval", "1", *QUICK,
            discovery=discovery,
        )  # fmt: skip
        server_at = f"127.0.0.1:{server_port}"

        def ready() -> bool:
            peers = peers_of(client)
            return (
                server_at in peers and peers[server_at]["latency_ms"] is not None
                and REFUSED in peers and not peers[REFUSED]["healthy"]
            )  # fmt: skip

        await until(ready, "the server found and the refused one unhealthy")
        # A datagram that is not LANA, to the discovery port: rejected.
        # (Broadcast, so that every socket on the port gets it, not one of them.)
        stray = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(stray.stopListening)
        stray.setBroadcastAllowed(True)
        stray.write(b"not a LANA datagram", (LOOPBACK_BROADCAST, discovery))

        sent: list[bytes] = []
        received: list[bytes] = []

        async def ask(path: str, body: dict[str, Any] | None, code: int) -> None:
            data = None if body is None else json.dumps(body).encode()
            response, answer = await self.request(
                port, path, b"GET" if data is None else b"POST", data
            )
            self.assertEqual(response.code, code, answer)
            sent.append(data or b"")
            received.append(answer)

        await ask("/api/generate", {"model": "llama3.2", "prompt": "a b c", "stream": False}, 200)
        await ask("/api/generate", {"model": "llama3.2", "prompt": "one two"}, 200)  # NDJSON
        await ask("/api/chat", {"model": "llama3.2", "messages": [{"content": "hi"}]}, 200)
        await ask("/api/nothing", None, 404)

        # A stream held by the fake is in flight.
        fake.gated = True
        body = json.dumps({"model": "llama3.2", "prompt": "x y"}).encode()
        held = defer.Deferred.fromCoroutine(self.request(port, "/api/generate", b"POST", body))
        await until(lambda: fake.open_streams == 1, "the stream started")
        samples = await self.metrics(port)
        self.assertEqual(samples[("ollana_requests_in_flight", frozenset())], 1)
        fake.release(10)
        response, answer = await held
        sent.append(body)
        received.append(answer)

        samples = await self.metrics(port)

        def value(name: str, **labels: str) -> float:
            return samples[(name, frozenset(labels.items()))]

        self.assertEqual(value("ollana_requests_total", peer=server_at, status="200"), 4)
        self.assertEqual(value("ollana_requests_total", peer=server_at, status="404"), 1)
        self.assertEqual(
            {dict(labels)["peer"] for name, labels in samples if name == "ollana_requests_total"},
            {server_at},
        )
        self.assertEqual(value("ollana_requests_in_flight"), 0)
        for histogram in ("ollana_time_to_first_byte_seconds", "ollana_request_duration_seconds"):
            self.assertEqual(value(f"{histogram}_count"), 5, histogram)
            self.assertEqual(value(f"{histogram}_bucket", le="+Inf"), 5, histogram)
            self.assertGreater(value(f"{histogram}_sum"), 0, histogram)
        self.assertLessEqual(
            value("ollana_time_to_first_byte_seconds_sum"),
            value("ollana_request_duration_seconds_sum"),
        )
        self.assertEqual(value("ollana_request_body_bytes_total"), sum(map(len, sent)))
        self.assertEqual(value("ollana_response_body_bytes_total"), sum(map(len, received)))
        self.assertEqual(value("ollana_peers", state="healthy"), 1)
        self.assertEqual(value("ollana_peers", state="unhealthy"), 1)
        self.assertGreaterEqual(value("ollana_discovery_packets_total", direction="sent"), 1)
        self.assertGreaterEqual(value("ollana_discovery_packets_total", direction="received"), 1)
        registry = client.observed.metrics.registry
        rejected = ("ollana_discovery_packets_total", {"direction": "rejected"})
        await until(lambda: registry.get_sample_value(*rejected) == 1, "the stray rejected")
        samples = await self.metrics(port)
        self.assertEqual(value("ollana_discovery_packets_total", direction="rejected"), 1)

        # The server counts its own: the requests above, and its announcements.
        server_samples = await self.metrics(server_port)
        self.assertGreaterEqual(
            sum(v for (name, _), v in server_samples.items() if name == "ollana_requests_total"), 5
        )
        self.assertGreaterEqual(
            server_samples[("ollana_discovery_packets_total", frozenset({("direction", "sent")}))],
            1,
        )
        self.assertEqual(server_samples[("ollana_peers", frozenset({("state", "healthy")}))], 0)

    async def test_zeros_before_anything_happened(self) -> None:
        _, url = self.ollama(["llama3.2:latest"])
        _, port = await self.start("--mode", "server", "--ollama", url)
        samples = await self.metrics(port)
        for direction in ("sent", "received", "rejected"):
            key = ("ollana_discovery_packets_total", frozenset({("direction", direction)}))
            self.assertEqual(samples[key], 0)
        for state in ("healthy", "unhealthy"):
            self.assertEqual(samples[("ollana_peers", frozenset({("state", state)}))], 0)
        self.assertEqual(samples[("ollana_requests_in_flight", frozenset())], 0)
        self.assertEqual(samples[("ollana_request_duration_seconds_count", frozenset())], 0)


class DashboardTests(Nodes):
    async def test_server_mode_page(self) -> None:
        fake, url = self.ollama(["llama3.2:latest"])
        server, port = await self.start("--mode", "server", "--ollama", url, *QUICK)
        await until(lambda: server.status()["ollama"]["healthy"], "the Ollama checked")
        response, body = await self.request(port, "/ollana/")
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'", headers.getRawHeaders(b"content-security-policy")[0])
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        page = Page(body.decode("utf-8"))
        self.assertEqual(page.h1, "Ollana server")
        self.assertEqual(page.field("Mode"), "server")
        self.assertEqual(page.field("Node"), server.settings.node_id.hex())
        self.assertEqual(page.field("Version"), __version__)
        self.assertEqual(page.field("Listening on"), f"127.0.0.1:{port}")
        self.assertRegex(page.field("Up for"), r"^\d+ s$")
        self.assertEqual(page.field("URL"), url)
        self.assertEqual(page.field("State"), "healthy")
        self.assertIn(("Version", "0.12.0"), page.pairs)
        self.assertEqual(page.field("Models"), "llama3.2:latest (1.0 KB)")
        self.assertEqual(page.rows, [])
        self.assertIn({"http-equiv": "refresh", "content": "5"}, page.meta)

        fake.up = False
        await until(lambda: not server.status()["ollama"]["healthy"], "the Ollama down")
        _, body = await self.request(port, "/ollana/")
        state = Page(body.decode("utf-8")).field("State")
        self.assertTrue(state.startswith("unhealthy "), state)
        self.assertIn("500", state)
        self.no_own_pages_upstream()

    async def test_client_mode_page_in_chromium(self) -> None:
        chromium = browser()
        _, url = self.ollama(["llama3.2:latest", HOSTILE])
        _, server_port = await self.start("--mode", "server", "--ollama", url, *QUICK)
        server_at = f"127.0.0.1:{server_port}"
        client, port = await self.start(
            "--mode", "client", "--peer", server_at, "--peer", REFUSED, *QUICK
        )

        def ready() -> bool:
            peers = peers_of(client)
            return len(peers.get(server_at, {}).get("models", [])) == 2 and (
                not peers.get(REFUSED, {"healthy": True})["healthy"]
            )

        await until(ready, "the servers checked")
        began = time.monotonic()
        dom = await self.dump_dom(chromium, f"http://127.0.0.1:{port}/ollana/")
        print(f"\nchromium took {time.monotonic() - began:.2f} s")
        page = Page(dom)
        self.assertEqual(page.title, "Ollana: client mode")
        self.assertEqual(page.h1, "Ollana client")
        self.assertEqual(page.field("Mode"), "client")
        self.assertEqual(page.field("Listening on"), f"127.0.0.1:{port}")
        self.assertIn("Servers (2)", page.text)
        up = page.row(server_at)
        self.assertEqual(up["Health"], "healthy")
        self.assertEqual(up["Source"], "static")
        self.assertRegex(up["Latency"], r"^\d+(\.\d)? ms$")
        self.assertEqual(up["Failures"], "0")
        self.assertEqual(up["Models"], f"{HOSTILE}:latest, llama3.2:latest")
        self.assertEqual((up["Loaded"], up["Slots"], up["Queue"]), ("none", "0 busy, 0 free", "0"))
        self.assertRegex(up["Last seen"], r"^\d+ s ago$")
        down = page.row(REFUSED)
        self.assertEqual(down["Health"], "unhealthy connection refused")
        self.assertEqual(down["Latency"], "-")
        self.assertEqual((down["Loaded"], down["Slots"], down["Queue"]), ("-", "-", "-"))
        # The hostile model name is text on the page, not elements the browser made.
        self.assertNotIn("script", page.elements)
        self.assertNotIn("img", page.elements)
        self.assertIn(HOSTILE, page.text)
        viewport = [m for m in page.meta if m.get("name") == "viewport"]
        self.assertEqual(viewport[0]["content"], "width=device-width, initial-scale=1")
        self.no_own_pages_upstream()

    async def dump_dom(self, chromium: str, url: str) -> str:
        """The DOM of the loaded page, as Chromium serializes it."""
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        args = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--disable-default-apps", "--no-proxy-server", "--window-size=390,844",
            # Loopback only: no name resolves.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}", "--dump-dom", url,
        ]  # fmt: skip
        run = Browser()
        env = {**os.environ, "HOME": profile}
        process = reactor.spawnProcess(run, chromium, args, env=env, path=profile)
        kill = reactor.callLater(45, process.signalProcess, "KILL")
        code = await run.ended
        if kill.active():
            kill.cancel()
        errors = run.err.decode("utf-8", "replace")[-2000:]
        self.assertEqual(code, 0, errors)
        self.assertIn(b"</html>", run.out, errors)
        return run.out.decode("utf-8")

    def test_hostile_values_are_escaped(self) -> None:
        peer = {
            "id": HOSTILE, "address": HOSTILE, "port": HOSTILE, "scheme": HOSTILE,
            "source": HOSTILE, "healthy": False, "reason": HOSTILE, "latency_ms": 1.5,
            "active_requests": HOSTILE, "total_requests": HOSTILE, "failures": HOSTILE,
            "models": [HOSTILE, '"quoted" & <b>bold</b>'], "last_seen": f'"{HOSTILE}',
            "last_seen_s_ago": 1, "unreported": HOSTILE,
        }  # fmt: skip
        ollama = {"url": HOSTILE, "healthy": False, "version": HOSTILE, "reason": HOSTILE}
        state = {
            "parallel": HOSTILE, "max_queue": HOSTILE, "max_loaded": HOSTILE,
            "loaded": [HOSTILE, "<b>bold</b>"], "models": {HOSTILE: {"in_flight": HOSTILE,
            "waiting": HOSTILE}}, "slots_busy": HOSTILE, "slots_free": HOSTILE, "queue": HOSTILE,
        }  # fmt: skip
        cases: list[tuple[str, dict[str, Any]]] = [
            ("client", {"peers": [{**peer, "state": state}], "ollama": None, "state": None}),
            ("server", {"peers": [], "ollama": ollama, "state": state}),
        ]
        for mode, extra in cases:
            status = {"mode": mode, "node_id": HOSTILE, "version": HOSTILE, "uptime_s": 3,
                      "listen": HOSTILE, **extra}  # fmt: skip
            html = self.successResultOf(flattenString(None, DashboardPage(status)))
            self.assertNotIn(b"<script", html.lower())
            self.assertNotIn(b"<img", html.lower())
            self.assertNotIn(b"<b>", html)
            page = Page(html.decode("utf-8"))
            self.assertEqual(set(page.elements) & {"script", "img", "b"}, set())
            self.assertEqual(page.field("Node"), HOSTILE)
            self.assertEqual(page.field("Listening on"), HOSTILE)
            if mode == "client":
                [row] = page.rows
                self.assertEqual(row["Health"], f"unhealthy {HOSTILE}")
                self.assertEqual(row["Models"], f'{HOSTILE}, "quoted" & <b>bold</b>')
                self.assertEqual(row["Loaded"], f"{HOSTILE}, <b>bold</b>")
                self.assertEqual(row["Slots"], f"{HOSTILE} busy, {HOSTILE} free")
                self.assertEqual(row["Queue"], HOSTILE)
            else:
                self.assertEqual(page.field("State"), f"unhealthy {HOSTILE}")
                self.assertEqual(page.field("URL"), HOSTILE)
                self.assertEqual(
                    page.field("Loaded models"), f"{HOSTILE}, <b>bold</b> (at most {HOSTILE})"
                )
                self.assertEqual(
                    page.field("Requests"), f"{HOSTILE}: {HOSTILE} in flight, {HOSTILE} waiting"
                )

    def test_no_server_yet(self) -> None:
        status = {"mode": "client", "node_id": "ab" * 16, "version": "1", "uptime_s": 0.2,
                  "listen": "127.0.0.1:11434", "ollama": None, "peers": []}  # fmt: skip
        html = self.successResultOf(flattenString(None, DashboardPage(status))).decode()
        page = Page(html)
        self.assertIn("Servers (0) No server known yet.", page.text)
        self.assertEqual(page.rows, [])
        self.assertIn(f"<style>{CSS}</style>", html)  # nothing in it was escaped

    def test_durations(self) -> None:
        self.assertEqual(
            [duration(s) for s in (0, 42.9, 185, 7800, 360000, -1)],
            ["0 s", "42 s", "3 min 5 s", "2 h 10 min", "4 d 4 h", "0 s"],
        )


class StateStatusTests(SynchronousTestCase):
    """A report as the status shows it: slots and queue summed up."""

    def test_slots_and_queue(self) -> None:
        state = ServerState(
            parallel=2, max_queue=9, max_loaded=2,
            loaded=frozenset({"llama3.2:latest", "qwen3:8b"}),
            # llama: three, for two slots; phi4: being loaded; "": requests naming no model.
            models={"llama3.2:latest": (3, 2), "phi4:latest": (2, 2), "": (4, 0)},
        )  # fmt: skip
        self.assertEqual(
            state_status(state),
            {"parallel": 2, "max_queue": 9, "max_loaded": 2,
             "loaded": ["llama3.2:latest", "qwen3:8b"],
             "models": {"": {"in_flight": 4, "waiting": 0},
                        "llama3.2:latest": {"in_flight": 3, "waiting": 2},
                        "phi4:latest": {"in_flight": 2, "waiting": 2}},
             "slots_busy": 2, "slots_free": 2, "queue": 3},
        )  # fmt: skip

    def test_idle_and_none(self) -> None:
        self.assertIsNone(state_status(None))
        idle = state_status(ServerState(parallel=4, loaded=frozenset({"a:latest"})))
        assert idle is not None
        self.assertEqual((idle["slots_busy"], idle["slots_free"], idle["queue"]), (0, 4, 0))


@implementer(INodeStatus)
class StillNode:
    """A node whose status and Ollama's models are given: what the pages read, no more."""

    def __init__(self, status: JSONObject, models: defer.Deferred[JSON]) -> None:
        self.registry = CollectorRegistry()
        self._status = status
        self._models = models
        self.asked = 0

    def status(self) -> JSONObject:
        return self._status

    def ollama_models(self) -> defer.Deferred[JSON]:
        self.asked += 1
        return self._models


class NodeStatusTests(SynchronousTestCase):
    """What the pages read of a node (INodeStatus): OllanaService provides it, and
    full_status adds a server's models from it."""

    def test_a_node_provides_it_in_each_mode(self) -> None:
        reactor = FakeNetworkReactor()
        for mode in ("auto", "server", "client"):
            settings = Settings(mode=mode, discovery=False, peers=(("gpu", 11435, "http"),))
            node = OllanaService(settings, reactor, FakeServers(reactor), lambda: [])
            self.assertTrue(verifyObject(INodeStatus, node))
            self.assertEqual(node.status()["mode"], "choosing" if mode == "auto" else mode)
            self.assertIs(node.registry, node.observed.metrics.registry)

    def test_a_servers_models_are_added(self) -> None:
        tags = {"models": [{"name": "llama3.2:latest", "size": 2, "digest": "d", "x": 1}]}
        node = StillNode({"mode": "server"}, defer.succeed(tags))
        self.assertEqual(
            self.successResultOf(full_status(node)),
            {"mode": "server", "models": [
                {"name": "llama3.2:latest", "size": 2, "digest": "d", "modified_at": None}
            ]},
        )  # fmt: skip

    def test_models_the_ollama_could_not_say_are_none(self) -> None:
        node = StillNode({"mode": "server"}, defer.fail(OllamaUnavailable("HTTP 500")))
        self.assertEqual(
            self.successResultOf(full_status(node)), {"mode": "server", "models": None}
        )
        node = StillNode({"mode": "server"}, defer.succeed(["not", "a", "listing"]))
        self.assertEqual(
            self.successResultOf(full_status(node)), {"mode": "server", "models": None}
        )

    def test_a_client_is_not_asked_for_models(self) -> None:
        node = StillNode({"mode": "client"}, defer.Deferred())
        self.assertEqual(self.successResultOf(full_status(node)), {"mode": "client"})
        self.assertEqual(node.asked, 0)


def _bytes_file(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
