"""Where requests go: the pool's servers in client mode, the local Ollama in server mode."""

from __future__ import annotations

import json
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from ollana.health import LocalOllamaMonitor, OllamaProbe, PeerHealthChecker
from ollana.interfaces import IRouter
from ollana.listings import MergedListings
from ollana.load import OllamaLoad
from ollana.peers import Peer, PeerPool, model_key
from ollana.routing import SERVER_SCAN_LIMIT, LocalRouter, PoolRouter
from ollana.state import STATE_HEADER, ServerState, decode, encode
from ollana.upstream import LocalAnswer, NoUpstream, Router, Upstream
from tests.support.fakes import FakeServers, capture_logs

START = 1000.0
OLLAMA = "http://127.0.0.1:11434"
ANY = "any:latest"  # a model no server lists: every healthy one is a candidate
NO_SERVER = "ollana: no Ollama server found on the LAN yet"
ONLY_LEGACY = (
    "ollana: only original (legacy) Ollana servers were found; they cannot be "
    "proxied to, upgrade them to this Ollana"
)


class Watching:
    """An attempt under way, as the router sees it: it hears when its upstream is down."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def upstream_down(self, reason: str) -> None:
        self.told.append(reason)


class PoolTestCase(SynchronousTestCase):
    """A pool of servers on a clock, and a client-mode router over it (make)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = PeerPool(self.clock, ttl=15)
        self.servers = FakeServers(self.clock)
        self.checker = PeerHealthChecker(
            self.pool, self.servers, self.clock, interval=5, timeout=2, models_interval=60
        )
        self.listings = MergedListings(self.pool, self.servers, self.clock, timeout=3)
        self.router = self.make()
        capture_logs(self)

    def make(self) -> PoolRouter:
        raise NotImplementedError


class PoolRouterTests(PoolTestCase):
    def make(self, strategy: str = "fastest", attempts: int = 2) -> PoolRouter:
        return PoolRouter(self.pool, self.checker, self.listings, strategy, attempts)

    def peer(self, name: str, latency: float, *models: str) -> Peer:
        peer = self.pool.add_static(f"{name}.example", 11435)
        self.servers.add(peer.url, models=list(models))
        self.pool.check_succeeded(peer, latency)
        peer.models = frozenset(model_key(m) for m in models)
        return peer

    def test_it_is_a_router(self) -> None:
        self.assertTrue(verifyObject(IRouter, self.router))

    def test_candidates_are_the_pools_best_first_up_to_attempts(self) -> None:
        slow = self.peer("a", 0.5)
        fast = self.peer("b", 0.01)
        self.peer("c", 0.9)
        upstreams = self.router.candidates(ANY)
        self.assertEqual(
            upstreams,
            [
                Upstream("http://b.example:11435", "b.example:11435"),
                Upstream("http://a.example:11435", "a.example:11435"),
            ],
        )
        self.assertEqual([u.server for u in upstreams], [fast, slow])
        self.assertEqual(len(self.make(attempts=1).candidates(ANY)), 1)
        self.assertEqual(len(self.make(attempts=5).candidates(ANY)), 3)

    def test_no_model_goes_to_the_first_healthy_server_by_address(self) -> None:
        """Not by the strategy: what one request does there (a blob pushed, say), the
        next one finds."""
        b = self.peer("b", 0.01)
        a = self.peer("a", 0.5)
        low = self.pool.add_static("198.18.0.10", 11435)
        self.pool.check_succeeded(low, 0.9)
        lower = self.pool.add_static("198.18.0.9", 11435)
        self.pool.check_succeeded(lower, 0.9)
        for strategy in ("ttft", "round-robin", "fastest"):
            router = self.make(strategy, attempts=5)
            for _ in range(3):
                upstreams = router.candidates(None)
                self.assertEqual([u.server for u in upstreams], [lower, low, a, b], strategy)
                self.assertEqual({u.route for u in upstreams}, {"default"})
        self.pool.suspect(lower, "connection refused")
        self.pool.request_failed(low, "HTTP 500")
        self.assertEqual([u.server for u in self.make(attempts=5).candidates(None)], [a, b, low])

    def test_candidates_are_those_having_the_model(self) -> None:
        self.peer("a", 0.01, "llama3.2:latest")
        having = self.peer("b", 0.5, "qwen3:8b")
        self.assertEqual([u.server for u in self.router.candidates("Qwen3:8b")], [having])
        self.assertEqual(len(self.router.candidates("gemma3")), 2, "no one has it")

    def test_candidates_follow_the_strategy(self) -> None:
        a = self.peer("a", 0.5)
        b = self.peer("b", 0.01)
        router = self.make("round-robin", attempts=1)
        firsts = [router.candidates(ANY)[0].server for _ in range(3)]
        self.assertEqual(firsts, [a, b, a])
        a.active = 0
        b.active = 3
        self.assertEqual(self.make("least-connections", 1).candidates(ANY)[0].server, a)
        self.assertEqual(self.make("fastest", 1).candidates(ANY)[0].server, b)

    def test_unhealthy_servers_as_a_last_resort(self) -> None:
        a = self.peer("a", 0.5)
        self.pool.suspect(a, "connection refused")
        self.assertEqual([u.server for u in self.router.candidates(None)], [a])

    def test_no_server_is_no_upstream(self) -> None:
        e = self.assertRaises(NoUpstream, self.router.candidates, None)
        self.assertEqual(str(e), NO_SERVER)
        self.pool.legacy_replied("198.18.0.9")
        e = self.assertRaises(NoUpstream, self.router.candidates, "llama3.2")
        self.assertEqual(str(e), ONLY_LEGACY)

    def test_started_and_ended_count_the_requests_of_a_server(self) -> None:
        a = self.peer("a", 0.01)
        b = self.peer("b", 0.5)
        router = self.make("least-connections", attempts=1)
        [first] = router.candidates(ANY)
        self.assertIs(first.server, a)
        one, two, three = Watching(), Watching(), Watching()
        router.started(first, one)
        router.started(first, two)
        self.assertEqual((a.active, b.active), (2, 0))
        [second] = router.candidates(ANY)
        self.assertIs(second.server, b)
        router.started(second, three)
        router.ended(first, one)
        router.ended(first, two)
        self.assertEqual((a.active, b.active), (0, 1))
        self.assertIs(router.candidates(ANY)[0].server, a)

    def test_failed_suspects_the_server(self) -> None:
        a = self.peer("a", 0.01)
        b = self.peer("b", 0.5)
        a.next_check = START + 60
        [upstream, _] = self.router.candidates(None)
        self.router.failed(upstream, "connection reset")
        self.assertFalse(a.healthy)
        self.assertEqual((a.reason, a.next_check), ("connection reset", 0.0))
        self.assertEqual([u.server for u in self.router.candidates(None)], [b])

    def test_wants_the_model_of_requests_with_a_body(self) -> None:
        for method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
            self.assertTrue(self.router.wants_model(method, b"/api/chat"), method)
        self.assertTrue(self.router.wants_model(b"DELETE", b"/api/delete"))
        self.assertTrue(self.router.wants_model(b"POST", b"/v1/chat/completions"))
        for method in (b"GET", b"HEAD", b"OPTIONS"):
            self.assertFalse(self.router.wants_model(method, b"/api/tags"), method)
        self.assertFalse(self.router.wants_model(b"POST", b"/api/blobs/sha256:" + b"0" * 64))
        self.assertFalse(self.router.wants_model(b"HEAD", b"/api/blobs/sha256:" + b"0" * 64))

    def test_scan_limit(self) -> None:
        self.assertEqual(self.router.scan_limit, 8 << 20)
        router = PoolRouter(self.pool, self.checker, self.listings, scan_limit=1024)
        self.assertEqual(
            (router.scan_limit, router.strategy.name, router.attempts), (1024, "ttft", 3)
        )

    def test_listings_are_merged_for_get_of_the_three_paths(self) -> None:
        self.peer("a", 0.01, "llama3.2:latest")
        self.peer("b", 0.5, "qwen3:8b")
        for path, key in (
            (b"/api/tags", "models"),
            (b"/api/ps", "models"),
            (b"/v1/models", "data"),
        ):
            listing = self.router.listing(b"GET", path)
            assert listing is not None, path
            answer = self.successResultOf(listing())
            self.assertIsInstance(answer, LocalAnswer)
            self.assertEqual(answer.code, 200)
            self.assertIn(key, json.loads(answer.body))
        names = [e["name"] for e in json.loads(self.successResultOf(self.tags()).body)["models"]]
        self.assertEqual(names, ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(len(self.servers.asked), 8, "each server asked for each listing")

    def tags(self) -> defer.Deferred[LocalAnswer]:
        listing = self.router.listing(b"GET", b"/api/tags?x=1")
        assert listing is not None
        return listing()

    def test_other_requests_are_no_listing(self) -> None:
        self.peer("a", 0.01, "llama3.2:latest")
        for method, path in [
            (b"POST", b"/api/tags"),
            (b"HEAD", b"/api/tags"),
            (b"DELETE", b"/v1/models"),
            (b"GET", b"/api/version"),
            (b"GET", b"/api/show"),
            (b"GET", b"/api/tags/extra"),
            (b"GET", b"/"),
        ]:
            self.assertIsNone(self.router.listing(method, path), (method, path))
        self.assertEqual(self.servers.asked, [])


class LocalRouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.servers = FakeServers(self.clock)
        self.servers.add(OLLAMA)
        self.monitor = LocalOllamaMonitor(
            OllamaProbe(self.servers, self.clock, OLLAMA), self.clock, interval=5, timeout=2
        )
        self.addCleanup(self.stop)
        self.router = LocalRouter(OLLAMA, self.monitor)
        capture_logs(self)

    def stop(self) -> None:
        if self.monitor.running:
            self.monitor.stopService()

    def down(self, reason: str) -> str:
        return f"ollana: the Ollama behind this server ({OLLAMA}) is down: {reason}"

    def test_it_is_a_router_and_so_is_the_base(self) -> None:
        self.assertTrue(verifyObject(IRouter, self.router))
        self.assertTrue(verifyObject(IRouter, Router(Upstream(OLLAMA))))

    def test_the_local_ollama_before_any_check(self) -> None:
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)])
        self.assertEqual(self.router.candidates("llama3.2"), [Upstream(OLLAMA)])

    def test_the_local_ollama_while_it_answers(self) -> None:
        self.monitor.startService()
        self.assertTrue(self.monitor.healthy)
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)])

    def test_a_refusing_ollama_is_still_tried(self) -> None:
        self.servers.refusing.add(OLLAMA)
        self.monitor.startService()
        self.assertTrue(self.monitor.known_down)
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)], "refusal is cheap")

    def test_an_answer_brings_it_back_at_once(self) -> None:
        self.servers.refusing.add(OLLAMA)
        self.monitor.startService()
        self.router.succeeded(Upstream(OLLAMA))
        self.assertTrue(self.monitor.healthy)
        self.assertEqual(self.monitor.reason, "answering")

    def test_a_request_refused_takes_it_down_at_once(self) -> None:
        downs: list[str] = []
        self.monitor.watch(lambda: None, downs.append)
        self.monitor.startService()
        waiting = Watching()
        self.router.started(Upstream(OLLAMA), waiting)
        self.router.failed(Upstream(OLLAMA), "connection refused")
        self.assertFalse(self.monitor.healthy)
        self.assertEqual((downs, waiting.told), (["connection refused"], ["connection refused"]))
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)])

    def test_requests_waiting_on_a_hung_ollama_are_told(self) -> None:
        self.monitor.startService()
        waiting, done = Watching(), Watching()
        self.router.started(Upstream(OLLAMA), waiting)
        self.router.started(Upstream(OLLAMA), done)
        self.router.ended(Upstream(OLLAMA), done)
        self.servers.hanging.add(OLLAMA)
        self.clock.advance(5)
        self.assertEqual(waiting.told, [])
        self.clock.advance(2)
        self.assertEqual((waiting.told, done.told), (["no answer within 2 s"], []))

    def test_no_upstream_when_found_broken_at_the_first_check(self) -> None:
        self.servers.ollamas[OLLAMA].up = False
        self.monitor.startService()
        e = self.assertRaises(NoUpstream, self.router.candidates, None)
        self.assertEqual(str(e), self.down("HTTP 500 from /api/version"))

    def test_no_upstream_while_down_and_back_when_it_answers(self) -> None:
        self.monitor.startService()
        self.servers.hanging.add(OLLAMA)
        self.clock.advance(5)
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)], "still checking")
        self.clock.advance(2)
        e = self.assertRaises(NoUpstream, self.router.candidates, "qwen3")
        self.assertEqual(str(e), self.down("no answer within 2 s"))
        self.servers.hanging.clear()
        self.servers.ollamas[OLLAMA].up = False
        self.clock.advance(3)
        e = self.assertRaises(NoUpstream, self.router.candidates, None)
        self.assertEqual(str(e), self.down("HTTP 500 from /api/version"))
        self.servers.ollamas[OLLAMA].up = True
        self.clock.advance(5)
        self.assertEqual(self.router.candidates(None), [Upstream(OLLAMA)])

    def test_like_the_base_router_otherwise(self) -> None:
        base = Router(Upstream(OLLAMA))
        for router in (base, self.router):
            self.assertFalse(router.wants_model(b"POST", b"/api/chat"))
            self.assertIsNone(router.listing(b"GET", b"/api/tags"))
        self.assertEqual(self.router.scan_limit, 0)


M = "llama3.2:latest"
KEY = "0123456789abcdef0123456789abcdef"
SECRET = b"correct horse battery staple"


def reported(state: ServerState, secret: bytes | None = None) -> Headers:
    """The headers of an answer that carries a server's state report."""
    return Headers({STATE_HEADER: [encode(state, secret)]})


class StateRoutingTests(PoolTestCase):
    """Client mode by the servers' state reports (the default strategy, ttft)."""

    def make(self, secret: bytes | None = None) -> PoolRouter:
        return PoolRouter(self.pool, self.checker, self.listings, secret=secret,
                          rng=random.Random(3))  # fmt: skip

    def peer(self, name: str, state: ServerState | None = None) -> Peer:
        peer = self.pool.add_static(f"{name}.example", 11435)
        self.pool.check_succeeded(peer, 0.001)
        peer.state = state
        return peer

    def test_candidates_say_why_and_carry_the_model_and_key(self) -> None:
        warm = self.peer("a", ServerState(loaded=frozenset({M})))
        cold = self.peer("b", ServerState())
        upstreams = self.router.candidates("Llama3.2", KEY)
        self.assertEqual(
            [(u.server, u.route, u.model, u.key) for u in upstreams],
            [(warm, "warm", "Llama3.2", KEY), (cold, "cold", "Llama3.2", KEY)],
        )
        self.assertEqual(upstreams[0], Upstream(warm.url, warm.address))
        for name in "cde":
            self.peer(name)
        self.assertEqual(len(self.router.candidates("llama3.2", KEY)), 3, "attempts")

    def test_a_report_replaces_the_state_and_what_was_counted_since(self) -> None:
        a = self.peer("a", ServerState(loaded=frozenset({M})))
        [upstream] = self.router.candidates("llama3.2")
        one, two = Watching(), Watching()
        self.router.started(upstream, one)
        self.router.started(upstream, two)
        self.assertEqual((a.active, a.unreported, a.unreported_models), (2, 2, {M: 2}))
        self.router.answered(upstream, one, Headers({b"content-type": [b"application/json"]}))
        self.assertEqual((a.unreported, a.unreported_models), (2, {M: 2}), "no report")
        report = ServerState(parallel=2, loaded=frozenset({M}), models={M: (2, 1)})
        self.router.answered(upstream, two, reported(report))
        self.assertEqual(a.state, report)
        self.assertEqual((a.active, a.unreported, a.unreported_models), (2, 0, {}))
        self.router.ended(upstream, one)
        self.assertEqual((a.active, a.unreported), (1, 0))

    def test_the_last_report_of_an_answer_counts(self) -> None:
        a = self.peer("a")
        old, new = ServerState(loaded=frozenset({M})), ServerState(parallel=4)
        [upstream] = self.router.candidates(None)
        headers = Headers({STATE_HEADER: [encode(old), encode(new)]})
        self.router.answered(upstream, Watching(), headers)
        self.assertEqual(a.state, new)

    def test_a_report_without_a_good_signature_is_ignored(self) -> None:
        router = self.make(secret=SECRET)
        a = self.peer("a")
        [upstream] = router.candidates("llama3.2")
        watcher = Watching()
        router.started(upstream, watcher)
        report = ServerState(loaded=frozenset({M}))
        signed = encode(report, SECRET)
        for value in [encode(report), encode(report, b"another secret"), signed[:-1],
                      signed.replace(b'"n":1', b'"n":9'), b"junk"]:  # fmt: skip
            router.answered(upstream, watcher, Headers({STATE_HEADER: [value]}))
            self.assertEqual((a.state, a.unreported), (None, 1), value)
        router.answered(upstream, watcher, reported(report, SECRET))
        self.assertEqual((a.state, a.unreported), (report, 0))

    def test_a_served_conversation_goes_back_to_its_server(self) -> None:
        a = self.peer("a", ServerState(parallel=4, loaded=frozenset({M})))
        b = self.peer("b", ServerState(parallel=4, loaded=frozenset({M}), models={M: (2, 0)}))
        upstreams = self.router.candidates("llama3.2", KEY)
        self.assertEqual([(u.server, u.route) for u in upstreams], [(a, "warm"), (b, "warm")])
        self.router.errored(upstreams[1], "HTTP 500")
        self.assertEqual(self.router.candidates("llama3.2", KEY)[0].route, "warm")
        self.router.succeeded(upstreams[1])  # b served it (a was tried first, say)
        self.assertEqual(
            [(u.server, u.route) for u in self.router.candidates("llama3.2", KEY)],
            [(b, "affinity"), (a, "warm")],
        )
        self.assertEqual(self.router.candidates("Llama3.2:latest", KEY)[0].server, b)
        self.assertEqual(self.router.candidates("llama3.2", "another")[0].server, a)
        self.assertEqual(self.router.candidates("llama3.2", None)[0].server, a)

    def test_waits_for_the_key_of_conversation_turns(self) -> None:
        self.assertTrue(self.router.wants_key(b"POST", b"/api/chat"))
        self.assertTrue(self.router.wants_key(b"POST", b"/v1/chat/completions?x=1"))
        self.assertTrue(self.router.wants_key(b"POST", b"/api/generate"))
        self.assertFalse(self.router.wants_key(b"GET", b"/api/chat"))
        self.assertFalse(self.router.wants_key(b"POST", b"/api/embed"))
        classic = PoolRouter(self.pool, self.checker, self.listings, "round-robin")
        self.assertFalse(classic.wants_key(b"POST", b"/api/chat"), "no use for it")


class LocalRouterLoadTests(SynchronousTestCase):
    """Server mode with a load tracker: requests counted, the report on every answer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.servers = FakeServers(self.clock)
        self.servers.answers[OLLAMA, "/api/ps"] = (200, {"models": [{"name": M}]})
        probe = OllamaProbe(self.servers, self.clock, OLLAMA)
        self.monitor = LocalOllamaMonitor(probe, self.clock, interval=5, timeout=2)
        self.load = OllamaLoad(probe, self.clock, interval=30, timeout=2, parallel=2)
        self.router = LocalRouter(OLLAMA, self.monitor, self.load)
        capture_logs(self)

    def report(self, router: Router | None = None, secret: bytes | None = None) -> ServerState:
        [(name, value)] = (router or self.router).response_headers()
        self.assertEqual(name, STATE_HEADER)
        state = decode(value, secret)
        assert state is not None
        return state

    def test_it_reads_the_model_of_requests(self) -> None:
        self.assertTrue(self.router.wants_model(b"POST", b"/api/chat"))
        self.assertFalse(self.router.wants_model(b"GET", b"/api/tags"))
        self.assertFalse(self.router.wants_model(b"POST", b"/api/blobs/sha256:" + b"0" * 64))
        self.assertEqual(self.router.scan_limit, SERVER_SCAN_LIMIT)
        self.assertFalse(self.router.wants_key(b"POST", b"/api/chat"), "the clients choose")

    def test_counts_each_request_and_reports_it_on_every_answer(self) -> None:
        [upstream] = self.router.candidates("llama3.2")
        self.assertEqual((upstream.url, upstream.model), (OLLAMA, "llama3.2"))
        one, two = Watching(), Watching()
        self.router.started(upstream, one)
        self.router.started(upstream, two)
        self.assertEqual(self.report(), ServerState(parallel=2, models={M: (2, 2)}))
        self.router.answered(upstream, one, Headers())
        self.assertEqual(self.report().models, {M: (2, 1)})
        self.assertEqual(self.report().loaded, frozenset({M}), "/api/ps read after the answer")
        self.router.ended(upstream, one)
        self.assertEqual(self.report().models, {M: (1, 1)})
        self.router.ended(upstream, two)  # never answered (the client left, say)
        self.assertEqual(self.report().models, {})

    def test_an_attempt_ended_before_its_answer_stops_waiting(self) -> None:
        [upstream] = self.router.candidates("llama3.2")
        first, second = Watching(), Watching()
        self.router.started(upstream, first)
        self.router.ended(upstream, first)
        self.router.started(upstream, second)
        self.router.answered(upstream, second, Headers())
        self.assertEqual(self.report().models, {M: (1, 0)})

    def test_the_report_is_signed_with_the_secret(self) -> None:
        load = OllamaLoad(OllamaProbe(self.servers, self.clock, OLLAMA), self.clock,
                          interval=30, timeout=2, secret=SECRET)  # fmt: skip
        router = LocalRouter(OLLAMA, self.monitor, load)
        router.started(router.candidates("llama3.2")[0], Watching())
        self.assertEqual(self.report(router, SECRET).models, {M: (1, 1)})
        [(_, value)] = router.response_headers()
        self.assertIsNone(decode(value))

    def test_no_report_without_a_load_tracker(self) -> None:
        router = LocalRouter(OLLAMA, self.monitor)
        self.assertEqual(tuple(router.response_headers()), ())
        self.assertEqual(tuple(Router(Upstream(OLLAMA)).response_headers()), ())
