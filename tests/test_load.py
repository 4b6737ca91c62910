"""Server mode's view of its Ollama's load: requests counted per model, /api/ps read."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ollana.health import OllamaProbe
from ollana.interfaces import IServerState, IStateSource
from ollana.load import OllamaLoad, environment_limits, ollama_limits
from ollana.state import ServerState, decode
from tests.support.fakes import FakeServers, capture_logs

START = 1000.0
OLLAMA = "http://127.0.0.1:11434"
M = "llama3.2:latest"
SECRET = b"correct horse battery staple"
INTERVAL = 30.0
TIMEOUT = 2.0


def ps(*names: object) -> tuple[int, dict[str, object]]:
    """An /api/ps answer listing these models."""
    return 200, {"models": [{"name": name, "model": name, "size": 1} for name in names]}


class LoadCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.servers = FakeServers(self.clock)
        self.servers.answers[OLLAMA, "/api/ps"] = ps()
        self.logged = capture_logs(self)
        self.load = self.make()

    def make(self, secret: bytes | None = None, **limits: int) -> OllamaLoad:
        probe = OllamaProbe(self.servers, self.clock, OLLAMA)
        load = OllamaLoad(probe, self.clock, INTERVAL, TIMEOUT, secret=secret, **limits)
        self.addCleanup(lambda: load.stopService() if load.running else None)
        return load

    def models(self) -> dict[str, tuple[int, int]]:
        return dict(self.load.report().models)

    def reads(self) -> list[float]:
        """When /api/ps was asked."""
        return self.servers.times("/api/ps")

    def failures(self) -> list[object]:
        return [event for event in self.logged if event.get("log_failure")]


class CountTests(LoadCase):
    def test_started_answered_and_ended_per_model(self) -> None:
        self.load.started("llama3.2")
        self.load.started("LLaMA3.2:latest")
        self.load.started("qwen3:8b")
        self.assertEqual(self.models(), {M: (2, 2), "qwen3:8b": (1, 1)})
        self.load.answered("llama3.2")
        self.assertEqual(self.models()[M], (2, 1))
        self.load.ended("llama3.2", answered=True)
        self.assertEqual(self.models()[M], (1, 1))
        self.load.answered("llama3.2")
        self.load.ended("llama3.2", answered=True)
        self.assertEqual(self.models(), {"qwen3:8b": (1, 1)})
        self.assertEqual(self.load.report().busy(), 1)

    def test_requests_without_a_model_take_no_slot(self) -> None:
        self.load.started(M)
        header = self.load.header()
        self.load.started(None)  # a listing, a version check
        self.load.started("")
        self.load.answered(None)
        self.load.ended(None, answered=True)
        self.load.ended("", answered=False)
        self.assertEqual(self.models(), {M: (1, 1)})
        self.assertIs(self.load.header(), header, "nothing changed")
        self.assertEqual(self.reads(), [], "no model: nothing to read /api/ps for")

    def test_ended_without_an_answer(self) -> None:
        self.load.started(M)
        self.load.started(M)
        self.load.answered(M)
        self.assertEqual(self.models(), {M: (2, 1)})
        self.load.ended(M, answered=False)  # the one still waiting (the client left, say)
        self.assertEqual(self.models(), {M: (1, 0)})
        self.load.ended(M, answered=True)
        self.assertEqual(self.models(), {})

    def test_counts_never_go_below_zero(self) -> None:
        self.load.ended(M, answered=False)
        self.load.answered("qwen3:8b")
        self.assertEqual(self.models(), {})
        self.load.started(M)
        self.load.answered(M)
        self.load.answered(M)  # a second answer to one request (a retried attempt)
        self.assertEqual(self.models(), {M: (1, 0)})
        self.load.ended(M, answered=False)
        self.load.ended(M, answered=False)
        self.assertEqual(self.models(), {})

    def test_the_report(self) -> None:
        load = self.make(parallel=4, max_queue=16, max_loaded=2)
        load.started(M)
        report = load.report()
        self.assertTrue(verifyObject(IServerState, report))
        self.assertEqual(
            report,
            ServerState(parallel=4, max_queue=16, max_loaded=2, loaded=frozenset(),
                        models={M: (1, 1)}),
        )  # fmt: skip

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IStateSource, self.load))


class HeaderTests(LoadCase):
    def test_the_header_is_the_report(self) -> None:
        self.load.started(M)
        self.assertEqual(decode(self.load.header()), self.load.report())

    def test_encoded_once_until_something_changes(self) -> None:
        header = self.load.header()
        self.assertIs(self.load.header(), header, "not encoded again")
        changes = [
            lambda: self.load.started(M),
            lambda: self.load.answered(M),
            lambda: self.load.ended(M, answered=True),
        ]
        self.servers.answers[OLLAMA, "/api/ps"] = ps(M)
        for change in changes:
            change()
            changed = self.load.header()
            self.assertIsNot(changed, header)
            self.assertEqual(decode(changed), self.load.report())
            self.assertIs(self.load.header(), changed)
            header = changed
        self.assertEqual(decode(header), ServerState(loaded=frozenset({M})), "read after answered")

    def test_a_new_list_of_loaded_models_is_a_change_the_same_list_is_not(self) -> None:
        self.load.startService()
        header = self.load.header()
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.clock.advance(INTERVAL)
        changed = self.load.header()
        self.assertEqual(decode(changed), ServerState(loaded=frozenset({M})))
        self.assertNotEqual(changed, header)
        self.clock.advance(INTERVAL)
        self.assertIs(self.load.header(), changed)

    def test_signed_with_the_secret(self) -> None:
        load = self.make(secret=SECRET)
        load.started(M)
        header = load.header()
        self.assertEqual(decode(header, SECRET), load.report())
        self.assertIsNone(decode(header, b"another secret"))
        self.assertIsNone(decode(header))


class LoadedModelTests(LoadCase):
    def test_read_at_start_and_every_interval(self) -> None:
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2", "Qwen3:8B", "x/y:1b")
        self.load.startService()
        self.assertEqual(self.load.loaded, frozenset({M, "qwen3:8b", "x/y:1b"}))
        self.servers.answers[OLLAMA, "/api/ps"] = ps()
        self.clock.advance(INTERVAL - 1)
        self.assertEqual(len(self.reads()), 1)
        self.clock.advance(1)
        self.assertEqual(self.reads(), [START, START + INTERVAL])
        self.assertEqual(self.load.loaded, frozenset())
        self.assertEqual(self.servers.asked[0][1], OLLAMA + "/api/ps")

    def test_a_read_asked_while_one_is_under_way_runs_once_after_it(self) -> None:
        self.servers.delays[OLLAMA] = 1.0
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.load.startService()
        self.load.read_loaded()
        self.load.read_loaded()
        self.assertEqual(self.reads(), [START])
        self.clock.advance(1)
        self.assertEqual(self.load.loaded, frozenset({M}))
        self.assertEqual(self.reads(), [START, START + 1], "asked again at once")
        self.servers.answers[OLLAMA, "/api/ps"] = ps("qwen3:8b")
        self.clock.advance(1)
        self.assertEqual(self.load.loaded, frozenset({"qwen3:8b"}), "the second answer")
        self.clock.advance(INTERVAL - 3)
        self.assertEqual(self.reads(), [START, START + 1], "and only once")

    def test_an_answer_for_a_model_not_loaded_reads_again(self) -> None:
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.load.startService()
        self.load.started(M)
        self.load.answered(M)
        self.load.started("qwen3:8b")
        self.assertEqual(len(self.reads()), 1, "not before its answer")
        self.servers.answers[OLLAMA, "/api/ps"] = ps("qwen3:8b")  # it evicted the other
        self.load.answered("qwen3:8b")
        self.assertEqual(self.reads(), [START, START])
        self.assertEqual(self.load.loaded, frozenset({"qwen3:8b"}))
        self.assertEqual(decode(self.load.header()).loaded,  # type: ignore[union-attr]
                         frozenset({"qwen3:8b"}))  # fmt: skip

    def test_entries_that_are_not_models_are_left_out(self) -> None:
        self.servers.answers[OLLAMA, "/api/ps"] = (
            200, {"models": [{"name": "llama3.2"}, {"name": 5}, "qwen3", None, {"model": "x"}]},
        )  # fmt: skip
        self.load.startService()
        self.assertEqual(self.load.loaded, frozenset({M}))

    def test_errors_keep_what_was_known_and_never_stop_the_reads(self) -> None:
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.load.startService()
        bad_answers: list[tuple[int, object]] = [
            (500, {"error": "boom"}),
            (200, ["llama3.2"]),
            (200, {"models": "llama3.2"}),
            (200, {"models": None}),
            (200, {}),
            (200, "junk"),
        ]
        for answer in bad_answers:
            self.servers.answers[OLLAMA, "/api/ps"] = answer
            self.clock.advance(INTERVAL)
            self.assertEqual(self.load.loaded, frozenset({M}), answer)
        del self.servers.answers[OLLAMA, "/api/ps"]
        self.clock.advance(INTERVAL)  # refused: nothing answers there
        self.servers.raising[OLLAMA] = RuntimeError("the getter broke")
        self.clock.advance(INTERVAL)
        del self.servers.raising[OLLAMA]
        self.servers.hanging.add(OLLAMA)
        self.clock.advance(INTERVAL + TIMEOUT)
        self.servers.hanging.clear()
        self.servers.answers[OLLAMA, "/api/ps"] = ps("qwen3:8b")
        self.clock.advance(INTERVAL - TIMEOUT)
        self.assertEqual(self.load.loaded, frozenset({"qwen3:8b"}), "still reading")
        self.assertEqual(len(self.reads()), 11)
        self.assertEqual(self.failures(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_read_that_hangs_times_out(self) -> None:
        self.servers.hanging.add(OLLAMA)
        self.load.startService()
        self.load.read_loaded()
        self.assertEqual(len(self.reads()), 1, "one under way")
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.servers.cancelled, [OLLAMA + "/api/ps"])
        self.assertEqual(len(self.reads()), 2, "the one asked meanwhile")
        self.clock.advance(TIMEOUT)
        self.servers.hanging.clear()
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.load.read_loaded()
        self.assertEqual(len(self.reads()), 3, "not blocked by those that hung")
        self.assertEqual(self.load.loaded, frozenset({M}))
        self.assertEqual(self.failures(), [])

    def test_stop_cancels_the_read_and_start_reads_again(self) -> None:
        self.servers.hanging.add(OLLAMA)
        self.load.startService()
        self.load.read_loaded()  # asked again once the one under way ends: not after stop
        self.load.stopService()
        self.assertEqual(self.servers.cancelled, [OLLAMA + "/api/ps"])
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(len(self.reads()), 1)
        self.servers.hanging.clear()
        self.servers.answers[OLLAMA, "/api/ps"] = ps("llama3.2")
        self.load.startService()
        self.assertEqual(self.load.loaded, frozenset({M}))
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.reads()), 3)
        self.load.stopService()
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(len(self.reads()), 3)
        self.assertEqual(self.failures(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitsTests(SynchronousTestCase):
    def test_ollamas_defaults_when_unset(self) -> None:
        self.assertEqual(ollama_limits({}), (1, 512, 3))

    def test_the_environment_ollama_reads(self) -> None:
        environ = {"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_MAX_QUEUE": "64",
                   "OLLAMA_MAX_LOADED_MODELS": "2", "OLLAMA_HOST": "0.0.0.0"}  # fmt: skip
        self.assertEqual(ollama_limits(environ), (4, 64, 2))

    def test_each_read_alone(self) -> None:
        self.assertEqual(ollama_limits({"OLLAMA_NUM_PARALLEL": "2"}), (2, 512, 3))
        self.assertEqual(ollama_limits({"OLLAMA_MAX_QUEUE": "10"}), (1, 10, 3))
        self.assertEqual(ollama_limits({"OLLAMA_MAX_LOADED_MODELS": "1"}), (1, 512, 1))

    def test_junk_zero_and_negative_values_are_the_defaults(self) -> None:
        for value in ["", "four", "2.5", "0x10", "-1", "0", "-0", "1e3", "\u0661\u0662x"]:
            environ = dict.fromkeys(
                ("OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_QUEUE", "OLLAMA_MAX_LOADED_MODELS"), value
            )
            self.assertEqual(ollama_limits(environ), (1, 512, 3), value)

    def test_this_processs_environment(self) -> None:
        self.patch(os, "environ", {"OLLAMA_NUM_PARALLEL": "3", "OLLAMA_MAX_QUEUE": "junk"})
        self.assertEqual(environment_limits(), (3, 512, 3))
