"""The simulated Ollama's promises: Ollama's answers, its browser policy, its scheduling.

Every request goes through a real Site over an in-memory connection, time on a Clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from ollana.origins import ALLOW_HEADERS, OriginPolicy
from ollana.simulator import (
    BUSY,
    FOREVER,
    FakeOllama,
    Scheduling,
    configure,
    go_duration,
    keep_alive_seconds,
    prompt_tokens,
    rfc3339,
)

# Binary fractions, so that the clock's sums are exact.
TIMES = Scheduling(load_seconds=2.0, prefill_seconds_per_token=0.125, token_seconds=0.25)


class Exchange:
    """One request to a FakeOllama's Site over an in-memory HTTP/1.1 connection."""

    def __init__(
        self,
        fake: FakeOllama,
        method: str,
        path: str,
        body: Any = None,
        headers: tuple[str, ...] = (),
        host: str = "127.0.0.1:11434",
    ) -> None:
        site = Site(fake.resource(), reactor=fake.clock or Clock())  # no timer left behind
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        data = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
        if body is not None:
            head.append(f"Content-Length: {len(data)}")
        self.channel.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode() + data)

    def _parts(self) -> tuple[bytes, bytes]:
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        return head, rest

    @property
    def status(self) -> int | None:
        head, _ = self._parts()
        return int(head.split(b" ")[1]) if head else None

    def header(self, name: str) -> list[str]:
        head, _ = self._parts()
        found = []
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.decode().partition(":")
            if key.lower() == name.lower():
                found.append(value.strip())
        return found

    @property
    def body(self) -> bytes:
        return self._body()[0]

    @property
    def done(self) -> bool:
        return self._body()[1]

    def _body(self) -> tuple[bytes, bool]:
        head, rest = self._parts()
        if b"transfer-encoding: chunked" not in head.lower():
            length = int((self.header("content-length") or ["0"])[0])
            return rest[:length], bool(head) and len(rest) >= length
        out = b""
        while rest:
            size, found, rest = rest.partition(b"\r\n")
            if not found:
                break
            if int(size, 16) == 0:
                return out, True
            out, rest = out + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        return out, False

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines()]

    def events(self) -> list[bytes]:
        return [event for event in self.body.split(b"\n\n") if event]

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def advance_to(clock: Clock, moment: float) -> None:
    """Advance to this time, stopping at each call due on the way, so each runs on time."""
    while clock.seconds() < moment:
        due = [call.getTime() for call in clock.getDelayedCalls()]
        clock.advance(max(0.0, min([*due, moment]) - clock.seconds()))


def generate(fake: FakeOllama, prompt: str, model: str = "llama3.2", **fields: Any) -> Exchange:
    return Exchange(fake, "POST", "/api/generate", {"model": model, "prompt": prompt, **fields})


class AnswersTests(SynchronousTestCase):
    """Without scheduling: Ollama's shapes and errors, at once or paced."""

    def test_paced_stream(self) -> None:
        clock = Clock()
        fake = FakeOllama(clock=clock)
        fake.pace = 2.0
        exchange = generate(fake, "a b")
        self.assertEqual((fake.emitted, exchange.transport.value()), (0, b""))
        clock.advance(2)
        self.assertEqual(fake.emitted, 1)
        self.assertEqual(exchange.lines()[0]["response"], "a ")
        clock.advance(2)
        clock.advance(2)
        self.assertEqual(fake.emitted, 3)
        self.assertTrue(exchange.done)
        final = exchange.lines()[-1]
        self.assertEqual((final["done"], final["done_reason"]), (True, "stop"))
        self.assertEqual((final["prompt_eval_count"], final["eval_count"]), (4, 2))

    def test_gated_stream(self) -> None:
        fake = FakeOllama(clock=Clock())
        fake.gated = True
        exchange = Exchange(
            fake, "POST", "/api/chat", {"model": "llama3.2", "messages": [{"content": "x y"}]}
        )
        self.assertEqual(fake.emitted, 0)
        fake.release(2)
        self.assertEqual(fake.emitted, 2)
        self.assertFalse(exchange.done)
        fake.release()
        self.assertTrue(exchange.lines()[-1]["done"])

    def test_non_streaming_chat(self) -> None:
        fake = FakeOllama(clock=Clock())
        body = {"model": "llama3.2", "stream": False, "messages": [{"content": "hi you"}]}
        answer = Exchange(fake, "POST", "/api/chat", body).json()
        self.assertEqual(answer["message"], {"role": "assistant", "content": "hi you "})
        self.assertEqual((answer["done"], answer["eval_count"]), (True, 2))

    def test_client_leaving_a_stream(self) -> None:
        clock = Clock()
        fake = FakeOllama(clock=clock)
        fake.pace = 1.0
        exchange = generate(fake, "a b c")
        clock.advance(1)
        exchange.leave()
        clock.advance(10)
        self.assertEqual((fake.abandoned, fake.emitted, fake.open_streams), (1, 1, 0))

    def test_sse_stream_ends_with_a_finish_reason(self) -> None:
        fake = FakeOllama()
        body = {"model": "llama3.2", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        exchange = Exchange(fake, "POST", "/v1/chat/completions", body)
        self.assertEqual(exchange.header("content-type"), ["text/event-stream"])
        events = exchange.events()
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"]["content"], "hi ")
        self.assertEqual(chunks[1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[2]["usage"]["completion_tokens"], 1)
        self.assertEqual(events[-1], b"data: [DONE]")

    def test_unknown_model(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"])
        cases = [
            ("/api/generate", {"model": "nope", "prompt": "x"}, "model 'nope' not found"),
            ("/api/chat", {"model": "nope:7b", "messages": [{"content": "x"}]},
             "model 'nope:7b' not found"),
            ("/api/show", {"model": "nope"}, "model 'nope' not found"),
            ("/api/embed", {"model": "nope", "input": "x"},
             'model "nope" not found, try pulling it first'),
            ("/api/embeddings", {"model": "nope", "prompt": "x"},
             'model "nope" not found, try pulling it first'),
        ]  # fmt: skip
        for path, body, message in cases:
            exchange = Exchange(fake, "POST", path, body)
            self.assertEqual((exchange.status, exchange.json()), (404, {"error": message}), path)
            self.assertEqual(exchange.header("content-type"), ["application/json; charset=utf-8"])
        openai = Exchange(fake, "POST", "/v1/chat/completions",
                          {"model": "nope", "messages": [{"content": "x"}]})  # fmt: skip
        self.assertEqual(openai.status, 404)
        self.assertEqual(openai.json(), {"error": {"message": "model 'nope' not found",
                         "type": "not_found_error", "param": None, "code": None}})  # fmt: skip

    def test_names_without_tag_mean_latest(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest", "qwen:7b"])
        self.assertEqual(Exchange(fake, "POST", "/api/show", {"model": "llama3.2"}).status, 200)
        self.assertEqual(Exchange(fake, "POST", "/api/show", {"model": "qwen"}).status, 404)
        self.assertEqual(Exchange(fake, "POST", "/api/show", {"model": "qwen:7b"}).status, 200)

    def test_bad_bodies(self) -> None:
        fake = FakeOllama()
        cases = [
            ("/api/generate", None, "missing request body"),
            ("/api/chat", b"  \n", "missing request body"),
            ("/api/chat", b"hello", "invalid character 'h' looking for beginning of value"),
            ("/api/chat", b'{"model": ', "unexpected EOF"),
            ("/api/generate", b"[1]",
             "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
            ("/api/generate", {"model": "llama3.2", "prompt": "x", "keep_alive": "5"},
             'time: missing unit in duration "5"'),
            ("/api/chat", {"messages": [{"content": "x"}]}, "model is required"),
        ]  # fmt: skip
        for path, body, message in cases:
            exchange = Exchange(fake, "POST", path, body)
            self.assertEqual((exchange.status, exchange.json()), (400, {"error": message}), body)
        openai = Exchange(fake, "POST", "/v1/chat/completions", None)
        self.assertEqual((openai.status, openai.json()["error"]["message"]), (400, "EOF"))

    def test_unknown_paths_and_methods(self) -> None:
        fake = FakeOllama()
        missing = Exchange(fake, "GET", "/api/nothing")
        self.assertEqual((missing.status, missing.body), (404, b"404 page not found"))
        wrong = Exchange(fake, "GET", "/api/generate")
        self.assertEqual((wrong.status, wrong.body), (405, b"405 method not allowed"))
        self.assertEqual(Exchange(fake, "POST", "/api/delete", {"model": "x"}).status, 405)

    def test_load_and_unload_requests(self) -> None:
        fake = FakeOllama()
        loaded = Exchange(fake, "POST", "/api/chat", {"model": "llama3.2", "messages": []}).json()
        self.assertEqual((loaded["done"], loaded["done_reason"]), (True, "load"))
        unloaded = generate(fake, "", keep_alive=0).json()
        self.assertEqual((unloaded["response"], unloaded["done_reason"]), ("", "unload"))

    def test_embeddings(self) -> None:
        fake = FakeOllama()
        embed = Exchange(fake, "POST", "/api/embed", {"model": "llama3.2", "input": ["a", "bb"]})
        self.assertEqual(len(embed.json()["embeddings"]), 2)
        legacy = Exchange(fake, "POST", "/api/embeddings", {"model": "llama3.2", "prompt": "a"})
        self.assertEqual(len(legacy.json()["embedding"]), 3)

    def test_blobs(self) -> None:
        fake = FakeOllama()
        good = hashlib.sha256(b"blob").hexdigest()
        path = f"/api/blobs/sha256:{good}"
        self.assertEqual(Exchange(fake, "HEAD", path).status, 404)
        self.assertEqual(Exchange(fake, "POST", path, b"blob").status, 201)
        self.assertEqual(Exchange(fake, "HEAD", path).status, 200)
        self.assertEqual(Exchange(fake, "POST", path, b"blob").status, 200)  # already there
        self.assertEqual(fake.blobs, {good})
        other = hashlib.sha256(b"other").hexdigest()
        mismatch = Exchange(fake, "POST", f"/api/blobs/sha256:{other}", b"blub")
        got = hashlib.sha256(b"blub").hexdigest()
        message = f'digest mismatch, expected "sha256:{other}", got "sha256:{got}"'
        self.assertEqual((mismatch.status, mismatch.json()), (400, {"error": message}))
        invalid = Exchange(fake, "POST", "/api/blobs/sha256:abc", b"x")
        self.assertEqual(
            (invalid.status, invalid.json()), (400, {"error": "invalid digest format"})
        )


class ModelManagementTests(SynchronousTestCase):
    """Pull, delete, copy and create, as Ollama answers them."""

    def names(self, fake: FakeOllama) -> list[str]:
        return [model["name"] for model in Exchange(fake, "GET", "/api/tags").json()["models"]]

    def test_pull(self) -> None:
        fake = FakeOllama(models=[], library=["qwen3:8b", "llama3.2"])
        pulled = Exchange(fake, "POST", "/api/pull", {"model": "llama3.2"})
        self.assertEqual(pulled.header("content-type"), ["application/x-ndjson"])
        statuses = [line["status"] for line in pulled.lines()]
        self.assertEqual((statuses[0], statuses[-1]), ("pulling manifest", "success"))
        self.assertEqual(self.names(fake), ["llama3.2:latest"])
        quiet = Exchange(fake, "POST", "/api/pull", {"model": "qwen3:8b", "stream": False})
        self.assertEqual((quiet.status, quiet.json()), (200, {"status": "success"}))
        missing = Exchange(fake, "POST", "/api/pull", {"model": "nope"})
        self.assertEqual(missing.lines()[-1], {"error": "pull model manifest: file does not exist"})
        missing = Exchange(fake, "POST", "/api/pull", {"model": "nope", "stream": False})
        self.assertEqual(missing.status, 500)
        self.assertEqual(self.names(fake), ["llama3.2:latest", "qwen3:8b"])

    def test_delete(self) -> None:
        fake = FakeOllama(models=["a:latest", "b:latest"])
        deleted = Exchange(fake, "DELETE", "/api/delete", {"model": "a"})
        self.assertEqual((deleted.status, deleted.body), (200, b""))
        self.assertEqual(self.names(fake), ["b:latest"])
        again = Exchange(fake, "DELETE", "/api/delete", {"model": "a"})
        self.assertEqual((again.status, again.json()), (404, {"error": "model 'a' not found"}))

    def test_copy(self) -> None:
        fake = FakeOllama(models=["a:latest"])
        copied = Exchange(fake, "POST", "/api/copy", {"source": "a", "destination": "b:v2"})
        self.assertEqual((copied.status, copied.body), (200, b""))
        self.assertEqual(self.names(fake), ["a:latest", "b:v2"])
        missing = Exchange(fake, "POST", "/api/copy", {"source": "c", "destination": "d"})
        self.assertEqual((missing.status, missing.json()), (404, {"error": 'model "c" not found'}))

    def test_create_from_blobs(self) -> None:
        fake = FakeOllama(models=[])
        digest = "sha256:" + hashlib.sha256(b"GGUF weights").hexdigest()
        files = {"model.gguf": digest}
        missing = Exchange(fake, "POST", "/api/create", {"model": "mine", "files": files})
        self.assertEqual((missing.status, missing.json()), (400, {"error": (
            f"blob not found for model.gguf (digest {digest}): file does not exist")}))  # fmt: skip
        self.assertEqual(
            Exchange(fake, "POST", f"/api/blobs/{digest}", b"GGUF weights").status, 201
        )
        created = Exchange(fake, "POST", "/api/create", {"model": "mine", "files": files})
        self.assertEqual([line["status"] for line in created.lines()],
                         ["parsing GGUF", "writing manifest", "success"])  # fmt: skip
        self.assertEqual(self.names(fake), ["mine:latest"])
        bad = Exchange(fake, "POST", "/api/create", {"model": "x", "files": {"f": "md5:1"}})
        self.assertEqual(bad.json(), {"error": "invalid digest for f: invalid digest format"})
        empty = Exchange(fake, "POST", "/api/create", {"model": "x"})
        self.assertEqual((empty.status, empty.json()),
                         (400, {"error": "neither 'from' or 'files' was specified"}))  # fmt: skip

    def test_create_from_a_model(self) -> None:
        fake = FakeOllama(models=["base:latest"], library=[])
        body = {"model": "derived", "from": "base", "system": "Be brief.", "stream": False}
        self.assertEqual(Exchange(fake, "POST", "/api/create", body).json(), {"status": "success"})
        self.assertEqual(self.names(fake), ["base:latest", "derived:latest"])
        body["from"] = "elsewhere"
        self.assertEqual(Exchange(fake, "POST", "/api/create", body).status, 500)


class BrowserTests(SynchronousTestCase):
    """Ollama's origin policy, applied by the simulator."""

    def test_preflight_from_an_allowed_origin(self) -> None:
        fake = FakeOllama()
        preflight = Exchange(fake, "OPTIONS", "/api/chat", headers=(
            "Origin: http://localhost:3000", "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: content-type"))  # fmt: skip
        self.assertEqual((preflight.status, preflight.body), (204, b""))
        self.assertEqual(preflight.header("access-control-allow-origin"), ["http://localhost:3000"])
        self.assertEqual(preflight.header("access-control-allow-methods"),
                         ["GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"])  # fmt: skip
        self.assertEqual(preflight.header("access-control-allow-headers"), [ALLOW_HEADERS])
        self.assertEqual(preflight.header("access-control-max-age"), ["43200"])
        self.assertEqual(preflight.header("vary"), ["Origin", "Access-Control-Request-Method",
                                                    "Access-Control-Request-Headers"])  # fmt: skip

    def test_refused_origin(self) -> None:
        fake = FakeOllama()
        for method in ("OPTIONS", "GET", "POST"):
            refused = Exchange(fake, method, "/api/tags", headers=("Origin: https://evil.example",))
            self.assertEqual((refused.status, refused.body), (403, b""), method)
            self.assertEqual(refused.header("access-control-allow-origin"), [])

    def test_allowed_origin_on_a_normal_request(self) -> None:
        fake = FakeOllama()
        tags = Exchange(fake, "GET", "/api/tags", headers=("Origin: app://obsidian.md",))
        self.assertEqual(tags.status, 200)
        self.assertEqual(tags.header("access-control-allow-origin"), ["app://obsidian.md"])
        self.assertEqual(tags.header("vary"), ["Origin"])

    def test_same_origin_and_no_origin_are_not_cors(self) -> None:
        fake = FakeOllama()
        same = Exchange(fake, "GET", "/api/tags", headers=("Origin: http://example.lan:11434",),
                        host="example.lan:11434")  # fmt: skip
        self.assertEqual(same.status, 200)
        self.assertEqual(same.header("access-control-allow-origin"), [])
        plain = Exchange(fake, "OPTIONS", "/api/tags")
        self.assertEqual((plain.status, plain.header("allow")),
                         (204, ["GET, HEAD, POST, DELETE, OPTIONS"]))  # fmt: skip

    def test_ollama_origins(self) -> None:
        fake = FakeOllama(
            origins=OriginPolicy.from_env({"OLLAMA_ORIGINS": "https://*.example.com"})
        )
        headers = ("Origin: https://chat.example.com",)
        self.assertEqual(Exchange(fake, "GET", "/api/tags", headers=headers).status, 200)
        everyone = FakeOllama(origins=OriginPolicy.from_env({"OLLAMA_ORIGINS": "*"}))
        tags = Exchange(everyone, "GET", "/api/tags", headers=("Origin: https://evil.example",))
        self.assertEqual(tags.header("access-control-allow-origin"), ["*"])


class SchedulingTests(SynchronousTestCase):
    """Scheduling as Ollama does: loads, slots, queues, evictions, caches, keep_alive."""

    def make(self, models: list[str] | None = None, **changes: Any) -> FakeOllama:
        self.clock = Clock()
        return FakeOllama(models=models or ["llama3.2:latest"], clock=self.clock,
                          scheduling=dataclasses.replace(TIMES, **changes))  # fmt: skip

    def after(self, seconds: float) -> None:
        advance_to(self.clock, self.clock.seconds() + seconds)

    def ps(self, fake: FakeOllama) -> list[str]:
        return [model["name"] for model in Exchange(fake, "GET", "/api/ps").json()["models"]]

    def test_a_cold_model_pays_its_load_a_warm_one_does_not(self) -> None:
        fake = self.make()
        cold = generate(fake, "a b c")  # 5 tokens: user a b c assistant
        advance_to(self.clock, 2.875 - 0.125)
        self.assertEqual(cold.transport.value(), b"")  # no header before the first token
        advance_to(self.clock, 2.875)  # load 2, prefill 5 × 0.125, a token 0.25
        self.assertEqual([line["response"] for line in cold.lines()], ["a "])
        advance_to(self.clock, 3.375)
        final = cold.lines()[-1]
        self.assertEqual(
            {k: final[k] for k in ("load_duration", "prompt_eval_count", "prompt_eval_cached_count",
                                   "prompt_eval_duration", "eval_count", "eval_duration",
                                   "total_duration")},
            {"load_duration": 2_000_000_000, "prompt_eval_count": 5,
             "prompt_eval_cached_count": 0, "prompt_eval_duration": 625_000_000,
             "eval_count": 3, "eval_duration": 750_000_000, "total_duration": 3_375_000_000},
        )  # fmt: skip
        self.assertTrue(cold.done)
        warm = generate(fake, "x y z")
        advance_to(self.clock, 3.375 + 4 * 0.125 + 0.25)  # "user" is cached: 4 tokens to evaluate
        self.assertEqual([line["response"] for line in warm.lines()], ["x "])
        self.after(0.5)
        final = warm.lines()[-1]
        self.assertEqual((final["load_duration"], final["prompt_eval_cached_count"]), (0, 1))
        scheduler = fake.scheduler
        assert scheduler is not None
        self.assertEqual(scheduler.loads, 1)
        first, second = scheduler.records
        self.assertEqual((first.cold, first.load, first.wait, first.first_token),
                         (True, 2.0, 0.0, 2.875))  # fmt: skip
        self.assertEqual((second.cold, second.load, second.first_token), (False, 0.0, 0.75))

    def test_the_second_request_waits_for_the_only_slot(self) -> None:
        fake = self.make(load_seconds=0.0)
        first, second = generate(fake, "a b c"), generate(fake, "d e f")
        advance_to(self.clock, 1.375)  # the first's end: 5 × 0.125 + 3 × 0.25
        self.assertTrue(first.done)
        self.assertEqual(second.transport.value(), b"")
        advance_to(self.clock, 1.375 + 4 * 0.125 + 0.25)
        self.assertEqual(len(second.lines()), 1)
        advance_to(self.clock, 5)
        assert fake.scheduler is not None
        self.assertEqual(fake.scheduler.records[1].wait, 1.375)

    def test_two_slots_serve_two_requests_at_once(self) -> None:
        fake = self.make(load_seconds=0.0, num_parallel=2)
        first, second = generate(fake, "a b c"), generate(fake, "d e f")
        advance_to(self.clock, 0.875)
        self.assertEqual((len(first.lines()), len(second.lines())), (1, 1))

    def test_an_idle_model_is_evicted_for_another(self) -> None:
        fake = self.make(["a:latest", "b:latest"], max_loaded=1)
        generate(fake, "x", model="a")
        self.after(10)
        self.assertEqual(self.ps(fake), ["a:latest"])
        other = generate(fake, "x", model="b")
        self.assertEqual(self.ps(fake), ["b:latest"])  # a went at once, b is loading
        self.after(10)
        self.assertTrue(other.done)
        self.assertEqual(other.lines()[-1]["load_duration"], 2_000_000_000)
        scheduler = fake.scheduler
        assert scheduler is not None
        self.assertEqual((scheduler.loads, scheduler.evictions), (2, 1))

    def test_a_busy_model_is_not_evicted(self) -> None:
        fake = self.make(["a:latest", "b:latest"], max_loaded=1, load_seconds=0.0)
        busy = generate(fake, "one two three four five six seven eight", model="a")
        self.after(1.5)  # prefill 1.25, then the first word
        waiting = generate(fake, "x", model="b")
        behind = generate(fake, "y", model="a")  # a is loaded, but waits behind b, as in Ollama
        self.after(0.75)
        self.assertEqual((self.ps(fake), len(busy.lines())), (["a:latest"], 4))
        self.assertEqual((waiting.transport.value(), behind.transport.value()), (b"", b""))
        advance_to(self.clock, 3.25)  # a's request ends: 1.25 + 8 × 0.25
        self.assertTrue(busy.done)
        self.assertEqual(self.ps(fake), ["b:latest"])
        advance_to(self.clock, 3.25 + 3 * 0.125)  # b, a fresh runner: prefill its 3 tokens
        self.assertEqual(waiting.transport.value(), b"")
        advance_to(self.clock, 3.25 + 3 * 0.125 + 0.25)  # and its word
        self.assertEqual((waiting.lines()[0]["response"], behind.transport.value()), ("x ", b""))
        self.after(5)
        self.assertTrue(behind.done)
        scheduler = fake.scheduler
        assert scheduler is not None
        self.assertEqual((scheduler.loads, scheduler.evictions), (3, 2))

    def test_the_idle_model_goes_rather_than_the_least_recently_used(self) -> None:
        fake = self.make(["a:latest", "b:latest", "c:latest"], max_loaded=2, load_seconds=0.0)
        busy = generate(fake, " ".join(["word"] * 40), model="a")  # until 0.75 + 40 × 0.25
        generate(fake, "x", model="b")
        self.after(1)
        newcomer = generate(fake, "x", model="c")
        self.after(1)
        self.assertEqual(newcomer.lines()[-1]["done"], True)
        self.assertFalse(busy.done)
        self.assertEqual(sorted(self.ps(fake)), ["a:latest", "c:latest"])

    def test_a_conversation_finds_its_cache_on_the_same_server(self) -> None:
        fake = self.make()
        history = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
        ]
        turn1 = Exchange(fake, "POST", "/api/chat", {"model": "llama3.2", "messages": history})
        self.after(10)
        answer = "".join(line["message"]["content"] for line in turn1.lines())
        history += [{"role": "assistant", "content": answer},
                    {"role": "user", "content": "and then"}]  # fmt: skip
        self.after(1)
        turn2 = Exchange(fake, "POST", "/api/chat", {"model": "llama3.2", "messages": history})
        self.after(10)
        final = turn2.lines()[-1]
        # system be brief user hi there assistant + the answer hi there: 9 tokens cached.
        self.assertEqual((final["prompt_eval_count"], final["prompt_eval_cached_count"]), (13, 9))
        self.assertEqual(final["prompt_eval_duration"], 4 * 125_000_000)
        elsewhere = self.make()
        Exchange(elsewhere, "POST", "/api/chat", {"model": "llama3.2", "messages": []})
        advance_to(
            self.clock, self.clock.seconds() + 10
        )  # loaded there, but with no cache of this conversation
        cold_cache = Exchange(elsewhere, "POST", "/api/chat", {"model": "llama3.2",
                                                               "messages": history})  # fmt: skip
        self.after(10)
        self.assertEqual(cold_cache.lines()[-1]["prompt_eval_cached_count"], 0)
        assert fake.scheduler is not None and elsewhere.scheduler is not None
        here, there = fake.scheduler.records[-1], elsewhere.scheduler.records[-1]
        assert here.first_token is not None and there.first_token is not None
        self.assertLess(here.first_token, there.first_token)

    def test_503_past_max_queue(self) -> None:
        fake = self.make(load_seconds=0.0, max_queue=1)
        running, waiting = generate(fake, "a b"), generate(fake, "c d")
        refused = generate(fake, "e f")
        self.assertEqual((refused.status, refused.json()), (503, {"error": BUSY}))
        self.assertEqual(BUSY, "server busy, please try again.  maximum pending requests exceeded")
        openai = Exchange(fake, "POST", "/v1/chat/completions",
                          {"model": "llama3.2", "messages": [{"content": "x"}]})  # fmt: skip
        self.assertEqual((openai.status, openai.json()["error"]["message"]), (503, BUSY))
        self.after(10)
        self.assertTrue(running.done and waiting.done)
        assert fake.scheduler is not None
        self.assertEqual(fake.scheduler.rejected, 2)

    def test_keep_alive_expiry_removes_the_model(self) -> None:
        fake = self.make()
        generate(fake, "a b c")
        advance_to(self.clock, 3.375)
        [entry] = Exchange(fake, "GET", "/api/ps").json()["models"]
        self.assertEqual(entry["expires_at"], "1970-01-01T00:05:03.375Z")
        self.assertEqual((entry["name"], entry["size_vram"], entry["context_length"]),
                         ("llama3.2:latest", entry["size"], 4096))  # fmt: skip
        self.assertEqual(set(entry) >= {"model", "digest", "details"}, True)
        advance_to(self.clock, 303.25)
        self.assertEqual(self.ps(fake), ["llama3.2:latest"])
        advance_to(self.clock, 303.375)
        self.assertEqual(self.ps(fake), [])
        assert fake.scheduler is not None
        self.assertEqual(fake.scheduler.expirations, 1)

    def test_a_request_says_how_long_to_keep_the_model(self) -> None:
        fake = self.make(["a:latest", "b:latest", "c:latest"], load_seconds=0.0)
        generate(fake, "x", model="a", keep_alive="1m")
        generate(fake, "x", model="b", keep_alive=0)
        generate(fake, "x", model="c", keep_alive=-1)
        self.after(1)
        self.assertEqual(self.ps(fake), ["c:latest", "a:latest"])  # the longest to stay first
        forever = Exchange(fake, "GET", "/api/ps").json()["models"][0]["expires_at"]
        self.assertEqual(forever, rfc3339(self.clock.seconds() + FOREVER))
        self.after(60)
        self.assertEqual(self.ps(fake), ["c:latest"])
        self.after(40_000)
        self.assertEqual(self.ps(fake), ["c:latest"])
        unload = generate(fake, "", model="c", keep_alive=0)
        self.assertEqual((unload.json()["done_reason"], self.ps(fake)), ("unload", []))

    def test_a_client_leaving_frees_its_slot(self) -> None:
        fake = self.make(load_seconds=0.0)
        leaving = generate(fake, "a b c d e f")
        queued, also_queued = generate(fake, "x"), generate(fake, "y")
        scheduler = fake.scheduler
        assert scheduler is not None
        self.assertEqual(scheduler.waiting(), 2)
        also_queued.leave()
        self.assertEqual(scheduler.waiting(), 1)
        advance_to(self.clock, 1.25)  # prefill 1.0, then the first word
        leaving.leave()
        self.assertEqual(scheduler.waiting(), 0)
        self.after(0.125 * 2 + 0.25)
        self.assertEqual(queued.lines()[0]["response"], "x ")
        self.after(10)
        self.assertEqual([r.outcome for r in scheduler.records], ["gone", "gone", "done"])
        self.assertEqual((fake.abandoned, fake.open_streams), (2, 0))

    def test_a_load_request_waits_for_the_load(self) -> None:
        fake = self.make()
        load = generate(fake, "")
        self.after(1.5)
        self.assertEqual(load.transport.value(), b"")
        self.after(0.5)
        self.assertEqual(load.json()["done_reason"], "load")
        self.assertEqual(self.ps(fake), ["llama3.2:latest"])

    def test_non_streamed_answers_come_at_the_end(self) -> None:
        fake = self.make(load_seconds=1.0)
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "a b"}]}
        chat = Exchange(fake, "POST", "/api/chat", {**body, "stream": False})
        openai = Exchange(fake, "POST", "/v1/chat/completions", body)
        self.after(2)
        self.assertEqual(chat.json()["message"]["content"], "a b ")
        self.assertEqual(chat.json()["load_duration"], 1_000_000_000)
        self.after(2)
        usage = openai.json()["usage"]
        self.assertEqual(usage["prompt_tokens_details"], {"cached_tokens": 3})  # user a b
        self.assertEqual(usage["total_tokens"], usage["prompt_tokens"] + 2)

    def test_embeddings_are_scheduled(self) -> None:
        fake = self.make()
        embed = Exchange(fake, "POST", "/api/embed", {"model": "llama3.2", "input": "a b"})
        self.after(2.125)
        self.assertEqual(embed.transport.value(), b"")
        self.after(0.125)
        self.assertEqual(len(embed.json()["embeddings"]), 1)

    def test_scheduling_needs_a_clock(self) -> None:
        self.assertRaises(ValueError, FakeOllama, scheduling=Scheduling())
        self.assertRaises(ValueError, Scheduling, num_parallel=0)


class PartsTests(SynchronousTestCase):
    """The pieces: durations, keep_alive, times, tokens, the command line."""

    def test_go_durations(self) -> None:
        self.assertEqual([go_duration(d) for d in ("5m", "1h30m", "1.5s", "-1s", "0", "250ms")],
                         [300, 5400, 1.5, -1, 0, 0.25])  # fmt: skip
        cases = [("5", 'missing unit in duration "5"'), ("abc", "invalid"), ("", "invalid"),
                 ("5x", 'unknown unit "x" in duration "5x"')]  # fmt: skip
        for bad, message in cases:
            with self.assertRaises(ValueError) as caught:
                go_duration(bad)
            self.assertIn(message, str(caught.exception))

    def test_keep_alive(self) -> None:
        self.assertEqual([keep_alive_seconds(v) for v in (30, "10m", -1, "-5m", 0)],
                         [30, 600, FOREVER, FOREVER, 0])  # fmt: skip
        with self.assertRaises(ValueError) as caught:
            keep_alive_seconds(True)
        self.assertEqual(str(caught.exception), "Unsupported type: 'bool'")

    def test_rfc3339(self) -> None:
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00Z")
        self.assertEqual(rfc3339(1.5), "1970-01-01T00:00:01.5Z")

    def test_prompt_tokens(self) -> None:
        chat = {
            "messages": [{"role": "system", "content": "s t"}, {"role": "user", "content": "u"}]
        }
        self.assertEqual(prompt_tokens("/api/chat", chat),
                         ["system", "s", "t", "user", "u", "assistant"])  # fmt: skip
        generated = {"system": "s", "prompt": "p q"}
        self.assertEqual(prompt_tokens("/api/generate", generated),
                         ["system", "s", "user", "p", "q", "assistant"])  # fmt: skip

    def test_command_line(self) -> None:
        args, scheduling, origins = configure(
            ["--port", "0", "--max-loaded", "1", "--num-parallel", "2", "--load-seconds", "2",
             "--model-load", "big:70b=30", "--keep-alive", "5m"], {})  # fmt: skip
        self.assertEqual((args.port, args.model), (0, ["echo:latest"]))
        assert scheduling is not None
        self.assertEqual((scheduling.max_loaded, scheduling.num_parallel, scheduling.keep_alive,
                          scheduling.load_time("big:70b"), scheduling.load_time("echo")),
                         (1, 2, 300, 30, 2))  # fmt: skip
        self.assertTrue(origins.allows("http://localhost:3000"))
        self.assertIsNone(configure([], {})[1])
        self.assertFalse(configure([], {})[2].allows("https://a.example"))
        self.assertTrue(configure([], {"OLLAMA_ORIGINS": "https://a.example"})[2].allows(
            "https://a.example"))  # fmt: skip
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), self.assertRaises(SystemExit):
            configure([], {"OLLAMA_ORIGINS": "https://a.example, https://b.example"})
        self.assertIn("OLLAMA_ORIGINS: bad origin ' https://b.example'", errors.getvalue())
