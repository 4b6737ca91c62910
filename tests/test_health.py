"""The Ollama probe, the local-Ollama monitor and the auto-mode choice."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from ollana import wire
from ollana.health import (
    LISTING_LIMIT,
    MAX_MODELS,
    VERSION_LIMIT,
    AgentGetter,
    LocalOllamaMonitor,
    OllamaProbe,
    OllamaUnavailable,
    PeerHealthChecker,
    choose_mode,
)
from ollana.peers import Peer, PeerPool
from tests.support.fake_ollama import FakeOllama
from tests.support.fakes import FakeServers, capture_logs
from tests.support.http import Silent

reactor: Any = _reactor
URL = "http://127.0.0.1:11434"
START = 1000.0  # the checker tests' clock starts here
A = "http://a.example:11435"
B = "http://198.18.0.2:11435"


class Refusing:
    """An HTTP client whose every connection is refused."""

    def __init__(self) -> None:
        self.calls = 0

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        return defer.fail(error.ConnectionRefusedError())


class Scripted:
    """Answers GETs from a fake Ollama while `answering`, refuses otherwise."""

    def __init__(self, fake: FakeOllama) -> None:
        self.stub: Any = StubTreq(fake.resource())
        self.answering = True

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        if not self.answering:
            return defer.fail(error.ConnectionRefusedError())
        return self.stub.get(url, **kwargs)


class OllamaProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeOllama(version="0.12.3")

    def probe(self, http: Any) -> OllamaProbe:
        return OllamaProbe(http, self.clock, URL + "/")

    def test_version(self) -> None:
        d = self.probe(StubTreq(self.fake.resource())).version(2)
        self.assertEqual(self.successResultOf(d), "0.12.3")
        self.assertEqual(self.fake.requests, [("GET", "/api/version")])

    def reason(self, d: defer.Deferred[Any]) -> str:
        return str(self.failureResultOf(d, OllamaUnavailable).value)

    def test_refused(self) -> None:
        self.assertEqual(self.reason(self.probe(Refusing()).version(2)), "connection refused")

    def test_error_status(self) -> None:
        self.fake.up = False
        d = self.probe(StubTreq(self.fake.resource())).version(2)
        self.assertEqual(self.reason(d), "HTTP 500 from /api/version")

    def test_not_an_ollama(self) -> None:
        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"version", _Static(b'{"name": "something else"}'))
        d = self.probe(StubTreq(root)).version(2)
        self.assertEqual(self.reason(d), "/api/version gave no valid answer")
        api.putChild(b"version", _Static(b"<html>"))
        self.assertEqual(
            self.reason(self.probe(StubTreq(root)).version(2)), "/api/version gave no valid answer"
        )
        api.putChild(b"version", _Static(b'{"version": 3}'))
        self.assertEqual(
            self.reason(self.probe(StubTreq(root)).version(2)), "/api/version gave no valid answer"
        )

    def test_timeout_cancels_the_request(self) -> None:
        silent = Silent()
        d = self.probe(StubTreq(silent)).version(2)
        self.assertNoResult(d)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.reason(d), "no answer within 2 s")

    def test_models(self) -> None:
        self.fake.models = ["llama3.2:latest", "qwen3:8b"]
        d = self.probe(StubTreq(self.fake.resource())).models(2)
        self.assertEqual(self.successResultOf(d), ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(self.fake.requests, [("GET", "/api/tags")])

    def test_no_models(self) -> None:
        self.fake.models = []
        d = self.probe(StubTreq(self.fake.resource())).models(2)
        self.assertEqual(self.successResultOf(d), [])

    def test_models_from_something_else(self) -> None:
        servers = FakeServers(self.clock)
        probe = OllamaProbe(servers, self.clock, URL)
        for answer in ({"models": 3}, {"models": [{"nom": "x"}]}, ["llama3.2"], {}):
            servers.answers[URL, "/api/tags"] = (200, answer)
            self.assertEqual(self.reason(probe.models(2)), "/api/tags gave no valid answer")
        servers.answers[URL, "/api/tags"] = (404, {"error": "not found"})
        self.assertEqual(self.reason(probe.models(2)), "HTTP 404 from /api/tags")
        self.fake.up = False
        d = self.probe(StubTreq(self.fake.resource())).models(2)
        self.assertEqual(self.reason(d), "HTTP 500 from /api/tags")

    def test_models_time_out(self) -> None:
        silent = Silent()
        d = self.probe(StubTreq(silent)).models(3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.reason(d), "no answer within 3 s")

    def test_json(self) -> None:
        self.fake.models = ["qwen3:8b"]
        probe = self.probe(StubTreq(self.fake.resource()))
        self.assertEqual(self.successResultOf(probe.json("/api/ps", 2)), {"models": []})
        listing = self.successResultOf(probe.json("/v1/models", 2))
        self.assertEqual(listing["object"], "list")
        self.assertEqual([m["id"] for m in listing["data"]], ["qwen3:8b"])
        self.assertEqual(self.fake.requests, [("GET", "/api/ps"), ("GET", "/v1/models")])

    def test_json_of_any_shape(self) -> None:
        servers = FakeServers(self.clock)
        servers.answers[URL, "/anything"] = (200, [1, "two", None])
        probe = OllamaProbe(servers, self.clock, URL)
        self.assertEqual(self.successResultOf(probe.json("/anything", 2)), [1, "two", None])

    def test_json_errors(self) -> None:
        probe = self.probe(StubTreq(self.fake.resource()))
        self.assertEqual(self.reason(probe.json("/nope", 2)), "HTTP 404 from /nope")
        root = Resource()
        root.putChild(b"page", _Static(b"<html>"))
        d = self.probe(StubTreq(root)).json("/page", 2)
        self.assertEqual(self.reason(d), "/page gave no valid answer")
        self.assertEqual(
            self.reason(self.probe(Refusing()).json("/api/ps", 2)), "connection refused"
        )
        d = self.probe(StubTreq(Silent())).json("/api/ps", 1.5)
        self.clock.advance(1.5)
        self.assertEqual(self.reason(d), "no answer within 1.5 s")

    def test_cancelling_cancels_the_request(self) -> None:
        servers = FakeServers(self.clock)
        servers.hanging.add(URL)
        d = OllamaProbe(servers, self.clock, URL).models(2)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(servers.cancelled, [URL + "/api/tags"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_models_beyond_max_models_are_left_out_in_one_line(self) -> None:
        servers = FakeServers(self.clock)
        names = [f"m{i}:latest" for i in range(MAX_MODELS + 5)]
        listed: list[Any] = [{"name": name} for name in names]
        servers.answers[URL, "/api/tags"] = (200, {"models": [*listed, {"nom": "x"}]})
        logs = capture_logs(self)
        probe = OllamaProbe(servers, self.clock, URL)
        self.assertEqual(self.successResultOf(probe.models(2)), names[:MAX_MODELS])
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in logs],
            [
                (
                    LogLevel.info,
                    f"{URL}/api/tags lists {MAX_MODELS + 6} entries; "
                    f"only the first {MAX_MODELS} are used",
                )
            ],
        )

    def test_max_models_are_all_used_quietly(self) -> None:
        servers = FakeServers(self.clock)
        names = [f"m{i}:latest" for i in range(MAX_MODELS)]
        servers.answers[URL, "/api/tags"] = (200, {"models": [{"name": n} for n in names]})
        logs = capture_logs(self)
        probe = OllamaProbe(servers, self.clock, URL)
        self.assertEqual(self.successResultOf(probe.models(2)), names)
        self.assertEqual(list(logs), [])

    def test_an_oversized_answer_is_no_model_list(self) -> None:
        servers = FakeServers(self.clock)
        servers.answers[URL, "/api/tags"] = (200, {"models": [], "pad": "x" * LISTING_LIMIT})
        self.assertEqual(
            self.reason(OllamaProbe(servers, self.clock, URL).models(2)),
            f"/api/tags gave an answer larger than {LISTING_LIMIT} bytes",
        )


class BoundedAnswerTests(SynchronousTestCase):
    """Answers are read up to a limit, over the production getter (an Agent) on a
    StringTransport: past the limit, or at the timeout, the download stops at once."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.probe = OllamaProbe(AgentGetter(Agent(self.reactor)), self.reactor, URL)

    def connect(self) -> StringTransport:
        """Accept the probe's connection: the request goes out on it."""
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 11434))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocol = protocol
        return transport

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def head(self, length: int | None) -> bytes:
        sized = b"" if length is None else b"Content-Length: %d\r\n" % length
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + sized + b"\r\n"

    def reason(self, d: defer.Deferred[Any]) -> str:
        return str(self.failureResultOf(d, OllamaUnavailable).value)

    def test_a_listing_over_the_limit_fails_and_stops_the_download(self) -> None:
        d = self.probe.models(2)
        transport = self.connect()
        self.assertTrue(transport.value().startswith(b"GET /api/tags HTTP/1.1\r\n"))
        self.answer(self.head(68_000_000) + b" " * (LISTING_LIMIT - 1))
        self.assertNoResult(d)
        self.assertEqual(transport.producerState, "producing")
        self.answer(b"  ")
        self.assertEqual(
            self.reason(d), f"/api/tags gave an answer larger than {LISTING_LIMIT} bytes"
        )
        self.assertEqual(transport.producerState, "stopped", "read no more")
        self.answer(b" " * 65536)  # what was under way changes nothing
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_listing_of_exactly_the_limit_is_read(self) -> None:
        body = json.dumps({"models": [{"name": "qwen3:8b"}]}).encode()
        body += b" " * (LISTING_LIMIT - len(body))
        d = self.probe.models(2)
        transport = self.connect()
        self.answer(self.head(len(body)) + body[:1000])
        self.answer(body[1000:])
        self.assertEqual(self.successResultOf(d), ["qwen3:8b"])
        self.assertEqual(transport.producerState, "producing")

    def test_a_version_answer_has_a_smaller_limit(self) -> None:
        d = self.probe.version(2)
        transport = self.connect()
        self.answer(self.head(None) + b" " * VERSION_LIMIT)
        self.assertNoResult(d)
        self.answer(b" ")
        self.assertEqual(
            self.reason(d), f"/api/version gave an answer larger than {VERSION_LIMIT} bytes"
        )
        self.assertEqual(transport.producerState, "stopped")

    def test_a_body_ended_by_the_close_is_read(self) -> None:
        d = self.probe.version(2)
        self.connect()
        self.answer(self.head(None) + b'{"version": "0.12.3"}')
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(d), "0.12.3")

    def test_a_body_cut_short_fails(self) -> None:
        d = self.probe.version(2)
        self.connect()
        self.answer(self.head(100) + b'{"version": "0.12.3"}')
        self.protocol.connectionLost(Failure(error.ConnectionLost()))
        self.assertIn("Connection to the other side was lost", self.reason(d))

    def test_the_timeout_stops_a_slow_body(self) -> None:
        d = self.probe.models(2)
        transport = self.connect()
        self.answer(self.head(1000) + b'{"models": [')
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.reason(d), "no answer within 2 s")
        self.assertEqual(transport.producerState, "stopped")


class _Static(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        return self.body


class LocalOllamaMonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.http = Scripted(FakeOllama(version="0.12.3"))
        self.events: list[str] = []
        self.monitor = LocalOllamaMonitor(
            OllamaProbe(self.http, self.clock, URL),
            self.clock,
            interval=5,
            timeout=3,
            on_up=lambda: self.events.append("up"),
            on_down=lambda reason: self.events.append("down"),
        )

    def test_checks_at_start_and_every_interval(self) -> None:
        self.monitor.startService()
        self.assertTrue(self.monitor.healthy)
        self.assertEqual(self.monitor.version, "0.12.3")
        self.assertEqual(self.events, ["up"])
        self.http.answering = False
        self.clock.advance(4.9)
        self.assertTrue(self.monitor.healthy)
        self.clock.advance(0.1)
        self.assertFalse(self.monitor.healthy)
        self.assertEqual(self.monitor.reason, "connection refused")
        self.assertEqual(self.events, ["up", "down"])
        self.clock.advance(5)
        self.assertEqual(self.events, ["up", "down"])
        self.http.answering = True
        self.clock.advance(5)
        self.assertTrue(self.monitor.healthy)
        self.assertEqual(self.events, ["up", "down", "up"])

    def test_down_at_start_is_not_a_transition(self) -> None:
        self.http.answering = False
        self.monitor.startService()
        self.assertFalse(self.monitor.healthy)
        self.assertEqual(self.events, [])

    def test_a_hanging_check_times_out_and_the_loop_goes_on(self) -> None:
        silent = Silent()
        self.http.stub = StubTreq(silent)
        self.monitor.startService()
        self.assertFalse(self.monitor.healthy)
        self.clock.advance(3)
        self.assertEqual(self.monitor.reason, "no answer within 3 s")
        self.clock.advance(2)
        self.assertEqual(len(silent.pending), 2)

    def test_errors_in_callbacks_never_stop_the_loop(self) -> None:
        def broken() -> None:
            raise RuntimeError("boom")

        self.monitor.watch(broken, lambda reason: None)
        self.monitor.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.http.answering = False
        self.clock.advance(5)
        self.assertFalse(self.monitor.healthy)
        self.http.answering = True
        self.clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_cancels_the_check_in_flight(self) -> None:
        silent = Silent()
        self.http.stub = StubTreq(silent)
        self.monitor.startService()
        [request] = silent.pending
        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)
        logs = capture_logs(self)
        self.monitor.stopService()
        self.http.stub.flush()
        self.assertEqual(len(lost), 1, "the request in flight is cancelled")
        self.clock.advance(60)
        self.assertEqual(len(silent.pending), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.monitor.reason, list(logs)), ("not checked yet", []))


class ChooseModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def choose(self, http: Any) -> defer.Deferred[tuple[str, str]]:
        probe = OllamaProbe(http, self.clock, URL)
        return defer.Deferred.fromCoroutine(choose_mode(probe, self.clock))

    def test_server_when_ollama_answers(self) -> None:
        d = self.choose(StubTreq(FakeOllama(version="0.12.3").resource()))
        self.assertEqual(
            self.successResultOf(d), ("server", "Ollama 0.12.3 answers at http://127.0.0.1:11434")
        )

    def test_client_after_a_few_refusals(self) -> None:
        http = Refusing()
        d = self.choose(http)
        self.clock.pump([0.5] * 3)
        self.assertEqual(
            self.successResultOf(d),
            ("client", "no Ollama at http://127.0.0.1:11434 (connection refused)"),
        )
        self.assertEqual(http.calls, 4)

    def test_server_when_ollama_comes_up_within_the_retries(self) -> None:
        http = Scripted(FakeOllama())
        http.answering = False
        d = self.choose(http)
        self.clock.advance(0.5)
        http.answering = True
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(d)[0], "server")

    def test_client_when_ollama_hangs(self) -> None:
        d = self.choose(StubTreq(Silent()))
        self.clock.pump([0.5] * 7)
        self.assertEqual(
            self.successResultOf(d),
            ("client", "no Ollama at http://127.0.0.1:11434 (no answer within 0.5 s)"),
        )

    def test_client_when_something_else_answers(self) -> None:
        fake = FakeOllama()
        fake.up = False
        d = self.choose(StubTreq(fake.resource()))
        self.clock.pump([0.5] * 3)
        self.assertEqual(self.successResultOf(d)[0], "client")


class BrokenPool(PeerPool):
    """A pool whose iteration, or recording of a good check, raises while told to."""

    broken_iteration = False
    broken_success = False

    def __iter__(self) -> Any:
        if self.broken_iteration:
            raise RuntimeError("the pool broke")
        return super().__iter__()

    def check_succeeded(self, peer: Peer, latency: float) -> bool:
        if self.broken_success:
            raise RuntimeError("recording broke")
        return super().check_succeeded(peer, latency)


class PeerHealthCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = BrokenPool(self.clock, ttl=30)
        self.servers = FakeServers(self.clock)
        self.fake = self.servers.add(A, models=["llama3.2:latest", "Qwen3:8b"])
        self.checker = self.make(max_backoff=40)
        self.events = capture_logs(self)

    def make(self, **kwargs: Any) -> PeerHealthChecker:
        options: dict[str, Any] = {"interval": 5, "timeout": 2, "models_interval": 60}
        options.update(kwargs)
        checker = PeerHealthChecker(self.pool, self.servers, self.clock, **options)

        def stop() -> None:
            if checker.running:
                checker.stopService()

        self.addCleanup(stop)
        return checker

    def static(self) -> Peer:
        return self.pool.add_static("a.example", 11435)

    def discovered(self) -> Peer:
        self.servers.add(B)
        return self.pool.announced(wire.Announce(bytes(16), 11435, "http", "0.1.0"), "198.18.0.2")

    def test_a_server_back_after_bye_is_checked_at_once(self) -> None:
        self.checker.startService()
        self.servers.hanging.add(B)
        self.discovered()  # checked at once; the check hangs
        self.assertEqual(len(self.checks(B)), 1)
        self.pool.said_bye(bytes(16))
        self.servers.hanging.discard(B)
        peer = self.discovered()  # back, as a new server: not left to the hanging check
        self.assertEqual(len(self.checks(B)), 2)
        self.assertIsNotNone(peer.last_ok)

    def test_a_server_that_moved_is_checked_at_once(self) -> None:
        self.checker.startService()
        self.pool.suspect(self.discovered(), "connection refused")  # gone from there
        self.servers.add("http://198.18.0.9:11435")
        self.pool.announced(wire.Announce(bytes(16), 11435, "http", "0.1.0"), "198.18.0.9")
        self.assertEqual(len(self.checks("http://198.18.0.9:11435")), 1)

    def checks(self, base: str = A) -> list[float]:
        """When base was checked, in seconds since the start."""
        return [when - START for when in self.servers.times("/api/version", base)]

    def tags(self, base: str = A) -> list[float]:
        return [when - START for when in self.servers.times("/api/tags", base)]

    def run_for(self, seconds: int) -> None:
        self.clock.pump([1] * seconds)

    def test_checks_every_usable_server_at_start_and_every_interval(self) -> None:
        static = self.static()
        discovered = self.discovered()
        self.pool.legacy_replied("198.18.0.9")
        self.checker.startService()
        self.clock.advance(4.9)
        self.assertEqual((self.checks(A), self.checks(B)), ([0], [0]))
        self.clock.advance(0.1)
        self.run_for(10)
        self.assertEqual((self.checks(A), self.checks(B)), ([0, 5, 10, 15], [0, 5, 10, 15]))
        self.assertEqual([url for _, url in self.servers.asked if "198.18.0.9" in url], [])
        self.assertTrue(static.healthy and discovered.healthy)
        self.assertEqual((static.last_ok, discovered.last_ok), (START + 15, START + 15))

    def test_a_new_server_is_checked_at_once(self) -> None:
        self.checker.startService()
        self.clock.advance(1)
        static = self.static()
        self.assertEqual((self.checks(A), self.tags(A)), ([1], [1]))
        self.assertEqual(static.models, frozenset({"llama3.2:latest", "qwen3:8b"}))
        self.clock.advance(2)
        discovered = self.discovered()
        self.assertEqual(self.checks(B), [3])
        self.assertEqual(discovered.last_ok, START + 3)
        self.clock.advance(2)
        self.assertEqual((self.checks(A), self.checks(B)), ([1, 5], [3, 5]))

    def test_known_servers_are_not_checked_again_when_heard_from(self) -> None:
        self.checker.startService()
        self.static()
        self.discovered()
        self.clock.advance(1)
        self.static()
        self.pool.announced(wire.Announce(bytes(16), 11435, "http", "0.1.0"), "198.18.0.2")
        self.assertEqual((self.checks(A), self.checks(B)), ([0], [0]))

    def test_a_new_server_is_not_checked_twice_at_once(self) -> None:
        self.servers.hanging.add(A)
        self.checker.startService()
        self.static()
        self.clock.advance(1.9)
        self.assertEqual(self.checks(), [0])

    def test_no_check_of_new_servers_while_stopped(self) -> None:
        self.static()
        self.checker.startService()
        self.checker.stopService()
        self.discovered()
        self.pool.legacy_replied("198.18.0.9")
        self.clock.advance(30)
        self.assertEqual((self.checks(A), self.checks(B)), ([0], []))

    def test_a_new_legacy_server_is_not_checked(self) -> None:
        self.checker.startService()
        self.pool.legacy_replied("198.18.0.9")
        self.assertEqual(self.servers.asked, [])

    def test_unhealthy_after_two_failures_and_healthy_after_one_success(self) -> None:
        peer = self.discovered()
        self.servers.refusing.add(B)
        self.checker.startService()
        self.assertEqual((peer.healthy, peer.failures), (True, 1))
        self.clock.advance(5)
        self.assertFalse(peer.healthy)
        self.assertEqual(peer.reason, "connection refused")
        self.clock.advance(5)
        self.assertFalse(peer.healthy)
        self.servers.refusing.discard(B)
        self.clock.advance(5)
        self.assertTrue(peer.healthy)
        self.assertEqual((peer.failures, peer.reason), (0, ""))
        warned = [e for e in self.events if e.get("log_format", "").endswith("unhealthy: {reason}")]
        self.assertEqual([e["reason"] for e in warned], ["connection refused"])

    def test_an_error_status_is_a_failure(self) -> None:
        peer = self.static()
        self.fake.up = False
        self.checker.startService()
        self.clock.advance(5)
        self.assertFalse(peer.healthy)
        self.assertEqual(peer.reason, "HTTP 500 from /api/version")

    def test_a_check_that_hangs_fails_after_the_timeout(self) -> None:
        peer = self.static()
        self.servers.hanging.add(A)
        self.checker.startService()
        self.clock.advance(1.9)
        self.assertEqual(peer.failures, 0)
        self.clock.advance(0.1)
        self.assertEqual((peer.failures, peer.reason), (1, "no answer within 2 s"))
        self.assertEqual(self.servers.cancelled, [A + "/api/version"])

    def test_no_second_check_while_one_is_in_flight(self) -> None:
        peer = self.discovered()
        self.servers.hanging.add(B)
        checker = self.make(timeout=8)
        checker.startService()
        self.run_for(20)
        self.assertEqual(self.checks(B), [0, 10, 20])
        self.assertEqual(peer.failures, 2)
        self.assertEqual(len(self.servers.cancelled), 2, "each timed out")

    def test_latency_comes_from_the_clock(self) -> None:
        peer = self.static()
        self.servers.delays[A] = 0.25
        self.checker.startService()
        self.clock.advance(0.2)
        self.assertIsNone(peer.latency)
        self.clock.advance(0.05)
        self.assertAlmostEqual(peer.latency, 0.25)
        self.assertEqual(peer.last_ok, START + 0.25)
        self.servers.delays[A] = 0.5
        self.clock.advance(4.75)
        self.clock.advance(0.5)
        self.assertAlmostEqual(peer.latency, 0.25 + 0.3 * 0.25)

    def test_models_are_fetched_on_the_first_success(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.assertEqual(peer.models, frozenset({"llama3.2:latest", "qwen3:8b"}))
        self.assertEqual(peer.models_checked, START)
        self.assertEqual(self.tags(), [0])

    def test_models_are_refreshed_after_models_interval(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.run_for(55)
        self.assertEqual(self.tags(), [0])
        self.assertEqual(len(self.checks()), 12)
        self.fake.models = ["gemma3:1b"]
        self.run_for(5)
        self.assertEqual(self.tags(), [0, 60])
        self.assertEqual(peer.models, frozenset({"gemma3:1b"}))
        self.assertEqual(peer.models_checked, START + 60)
        self.run_for(60)
        self.assertEqual(self.tags(), [0, 60, 120])

    def test_models_are_fetched_again_on_recovery(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.fake.up = False
        self.run_for(10)
        self.assertFalse(peer.healthy)
        self.fake.up = True
        self.fake.models = ["gemma3:1b"]
        self.run_for(5)
        self.assertTrue(peer.healthy)
        self.assertEqual(peer.models, frozenset({"gemma3:1b"}))
        self.assertEqual(self.tags(), [0, 15])

    def test_models_are_kept_when_the_listing_fails(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.servers.answers[A, "/api/tags"] = (500, {"error": "broken"})
        self.run_for(60)
        self.assertTrue(peer.healthy)
        self.assertEqual(peer.models, frozenset({"llama3.2:latest", "qwen3:8b"}))
        self.assertEqual(peer.models_checked, START)
        self.assertIn("No model list from {url}: {reason}", [e["log_format"] for e in self.events])

    def test_static_servers_that_stay_down_are_checked_with_doubling_backoff(self) -> None:
        peer = self.static()
        self.servers.refusing.add(A)
        self.checker.startService()
        self.run_for(200)
        # Down after the second; then 5 s later, 10, 20, 40 and no more than max_backoff.
        self.assertEqual(self.checks(), [0, 5, 10, 20, 40, 80, 120, 160, 200])
        self.servers.refusing.discard(A)
        self.run_for(50)
        self.assertEqual(self.checks()[9:], [240, 245, 250])
        self.assertTrue(peer.healthy)
        self.assertEqual(peer.next_check, 0.0)

    def test_the_default_backoff_cap_is_60_seconds(self) -> None:
        self.static()
        self.servers.refusing.add(A)
        self.make().startService()
        self.run_for(260)
        self.assertEqual(self.checks(), [0, 5, 10, 20, 40, 80, 140, 200, 260])

    def test_the_backoff_cap_is_never_below_the_interval(self) -> None:
        self.assertEqual(self.make(max_backoff=1).max_backoff, 5)

    def test_a_discovered_server_is_not_backed_off(self) -> None:
        peer = self.discovered()
        self.servers.refusing.add(B)
        self.checker.startService()
        self.run_for(60)
        self.assertEqual(self.checks(B), list(range(0, 61, 5)))
        self.assertEqual((peer.healthy, peer.next_check), (False, 0.0))

    def test_suspect_checks_at_the_next_tick_despite_the_backoff(self) -> None:
        peer = self.static()
        self.servers.refusing.add(A)
        self.checker.startService()
        self.run_for(21)  # checked at 20, next at 40
        self.checker.suspect(peer, "connection reset")
        self.assertEqual(peer.reason, "connection reset")
        self.run_for(4)
        self.assertEqual(self.checks(), [0, 5, 10, 20, 25])

    def test_suspect_takes_a_server_out_until_a_check_succeeds(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.clock.advance(1)
        self.checker.suspect(peer, "connection reset")
        self.assertFalse(peer.healthy)
        self.assertEqual(self.pool.candidates("fastest"), [peer], "the last resort")
        self.clock.advance(4)
        self.assertTrue(peer.healthy)
        self.assertEqual(self.tags(), [0, 5], "models fetched again on recovery")

    def test_a_getter_that_raises_is_a_failed_check_and_the_loop_goes_on(self) -> None:
        peer = self.static()
        self.servers.raising[A] = RuntimeError("boom")
        self.checker.startService()
        self.clock.advance(5)
        self.assertFalse(peer.healthy)
        self.assertEqual(peer.reason, "boom")
        warned = [e for e in self.events if e.get("log_format", "").endswith("unhealthy: {reason}")]
        self.assertEqual([e["reason"] for e in warned], ["boom"])
        del self.servers.raising[A]
        self.run_for(5)
        self.assertTrue(peer.healthy)
        self.assertEqual(self.checks(), [0, 5, 10])

    def test_the_loop_survives_a_pool_that_raises(self) -> None:
        peer = self.static()
        self.pool.broken_iteration = True
        self.checker.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("Error in the server health checks", [e["log_format"] for e in self.events])
        self.assertEqual(self.checks(), [])
        self.pool.broken_iteration = False
        self.clock.advance(5)
        self.assertEqual(self.checks(), [5])
        self.assertEqual(peer.last_ok, START + 5)

    def test_the_loop_survives_an_error_while_recording_a_check(self) -> None:
        peer = self.static()
        self.pool.broken_success = True
        self.checker.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("Error while checking {url}", [e["log_format"] for e in self.events])
        self.pool.broken_success = False
        self.clock.advance(5)
        self.assertEqual(self.checks(), [0, 5])
        self.assertEqual(peer.last_ok, START + 5)

    def test_stop_cancels_the_check_in_flight_and_changes_nothing(self) -> None:
        peer = self.static()
        self.servers.hanging.add(A)
        self.checker.startService()
        self.checker.stopService()
        self.assertEqual(self.servers.cancelled, [A + "/api/version"])
        self.assertEqual((peer.healthy, peer.failures, peer.reason), (True, 0, ""))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.checks(), [0])
        self.assertEqual([e for e in self.events if e.get("log_level") == LogLevel.warn], [])

    def test_stop_cancels_a_model_listing_in_flight(self) -> None:
        peer = self.static()
        self.servers.hanging.add(A + "/api/tags")
        self.checker.startService()
        self.assertEqual(peer.last_ok, START)
        self.checker.stopService()
        self.assertEqual(self.servers.cancelled, [A + "/api/tags"])
        self.assertEqual((peer.models, peer.models_checked), (frozenset(), None))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn(
            "No model list from {url}: {reason}", [e["log_format"] for e in self.events]
        )

    def test_a_check_after_stop_records_nothing(self) -> None:
        peer = self.static()
        self.servers.delays[A] = 1
        self.checker.startService()
        self.checker.stopService()
        self.clock.advance(10)
        self.assertEqual((peer.last_ok, peer.latency), (None, None))

    def test_legacy_servers_are_never_checked(self) -> None:
        peer = self.pool.legacy_replied("198.18.0.9")
        self.checker.startService()
        self.run_for(30)
        self.assertEqual(self.servers.asked, [])
        self.assertEqual((peer.last_ok, peer.failures), (None, 0))

    def test_the_result_of_check_fires(self) -> None:
        peer = self.static()
        self.checker.startService()
        self.clock.advance(1)
        self.fake.up = False
        self.assertIsNone(self.successResultOf(self.checker.check(peer)))
        self.assertEqual(peer.failures, 1)
        self.fake.up = True
        self.assertIsNone(self.successResultOf(self.checker.check(peer)))
        self.assertEqual((peer.failures, peer.last_ok), (0, START + 1))
        self.assertEqual(self.flushWarnings(), [], "no callback returns its own Deferred")


class AgentGetterTests(TestCase):
    """The getter health checks use in production, over real loopback sockets."""

    async def check_at(self, host: str, interface: str) -> None:
        fake = FakeOllama(version="0.12.3", clock=reactor)
        try:
            port = reactor.listenTCP(0, fake.site(), interface=interface)
        except error.CannotListenError as e:
            raise SkipTest(f"no {interface} here: {e}") from None
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        getter = AgentGetter(Agent(reactor, pool=pool))
        probe = OllamaProbe(getter, reactor, f"http://{host}:{port.getHost().port}")
        self.assertEqual(await probe.version(5), "0.12.3")
        self.assertEqual(await probe.models(5), ["llama3.2:latest"])

    async def test_ipv4(self) -> None:
        await self.check_at("127.0.0.1", "127.0.0.1")

    async def test_ipv6(self) -> None:
        await self.check_at("[::1]", "::1")  # treq's own getter fails here
