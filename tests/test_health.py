"""The Ollama probe, the local-Ollama monitor and the auto-mode choice."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ollana.health import LocalOllamaMonitor, OllamaProbe, OllamaUnavailable, choose_mode
from tests.fake_ollama import FakeOllama
from tests.support import capture_logs

URL = "http://127.0.0.1:11434"


class Silent(Resource):
    """Accepts requests and never answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


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

    def reason(self, d: defer.Deferred[str]) -> str:
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
            on_down=lambda: self.events.append("down"),
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

        self.monitor.on_up = broken
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
