"""Client mode's merged listings: GET /api/tags, /api/ps and /v1/models over all servers."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ollana.health import LISTING_LIMIT, MAX_MODELS
from ollana.listings import SERVERS_FIELD, MergedListings
from ollana.peers import Peer, PeerPool
from ollana.upstream import LocalAnswer, NoUpstream, UpstreamsFailed
from tests.support.fakes import FakeServers, capture_logs

START = 1000.0
A = "http://a.example:11435"
B = "http://b.example:11435"
NO_SERVER = "ollana: no Ollama server found on the LAN yet"
ONLY_LEGACY = (
    "ollana: only original (legacy) Ollana servers were found; they cannot be "
    "proxied to, upgrade them to this Ollana"
)


def ps_entry(name: str, vram: int) -> dict[str, Any]:
    return {"name": name, "model": name, "size": 1000, "size_vram": vram, "digest": name}


def listed(entry: dict[str, Any], *servers: str) -> dict[str, Any]:
    """An entry as the merge gives it: with the servers (a, b) that list it."""
    return {**entry, SERVERS_FIELD: [f"{name}.example:11435" for name in servers]}


class MergedListingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = PeerPool(self.clock, ttl=15)
        self.servers = FakeServers(self.clock)
        self.listings = MergedListings(self.pool, self.servers, self.clock, timeout=3)
        capture_logs(self)
        # b is the faster, so it comes first.
        self.a = self.peer("a", 0.5, ["llama3.2:latest", "qwen3:8b"])
        self.b = self.peer("b", 0.1, ["qwen3:8b", "gemma3:1b"])

    def peer(self, name: str, latency: float, models: list[str]) -> Peer:
        peer = self.pool.add_static(f"{name}.example", 11435)
        self.servers.add(peer.url, models=models)
        self.pool.check_succeeded(peer, latency)
        return peer

    def ask(self, target: bytes) -> defer.Deferred[LocalAnswer]:
        listing = self.listings.lookup(b"GET", target)
        assert listing is not None, target
        return listing()

    def answer(self, target: bytes) -> tuple[LocalAnswer, Any]:
        answer = self.successResultOf(self.ask(target))
        self.assertEqual(answer.code, 200)
        return answer, json.loads(answer.body)

    def header(self, answer: LocalAnswer, name: bytes) -> str:
        [value] = [v for n, v in answer.headers if n == name]
        return value.decode("utf-8")

    def failure(self, target: bytes, kind: type[Exception]) -> str:
        return str(self.failureResultOf(self.ask(target), kind).value)

    def test_tags_merged_each_model_once_in_order(self) -> None:
        answer, listing = self.answer(b"/api/tags")
        self.assertEqual(list(listing), ["models"])
        names = [entry["name"] for entry in listing["models"]]
        self.assertEqual(names, ["qwen3:8b", "gemma3:1b", "llama3.2:latest"])
        self.assertEqual(listing["models"][2]["details"]["family"], "fake", "entries as given")
        self.assertEqual(self.header(answer, b"content-type"), "application/json; charset=utf-8")
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "b.example:11435, a.example:11435")

    def test_tags_say_which_servers_list_each_model(self) -> None:
        _, listing = self.answer(b"/api/tags")
        servers = {entry["name"]: entry[SERVERS_FIELD] for entry in listing["models"]}
        self.assertEqual(servers, {
            "qwen3:8b": ["a.example:11435", "b.example:11435"],
            "gemma3:1b": ["b.example:11435"],
            "llama3.2:latest": ["a.example:11435"],
        })  # fmt: skip
        self.servers.refusing.add(A)
        _, listing = self.answer(b"/api/tags")
        servers = {entry["name"]: entry[SERVERS_FIELD] for entry in listing["models"]}
        self.assertEqual(servers, {"qwen3:8b": ["b.example:11435"],
                                   "gemma3:1b": ["b.example:11435"]})  # fmt: skip
        _, listing = self.answer(b"/v1/models")
        self.assertNotIn(SERVERS_FIELD, listing["data"][0], "OpenAI's shape stays as it is")

    def test_the_order_is_the_pools(self) -> None:
        self.a.latency = 0.05
        answer, listing = self.answer(b"/api/tags")
        names = [entry["name"] for entry in listing["models"]]
        self.assertEqual(names, ["llama3.2:latest", "qwen3:8b", "gemma3:1b"])
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435, b.example:11435")

    def test_ps_merged(self) -> None:
        self.servers.answers[A, "/api/ps"] = (200, {"models": [ps_entry("qwen3:8b", 7)]})
        self.servers.answers[B, "/api/ps"] = (
            200,
            {"models": [ps_entry("gemma3:1b", 1), ps_entry("qwen3:8b", 9)]},
        )
        answer, listing = self.answer(b"/api/ps")
        gemma, qwen = ps_entry("gemma3:1b", 1), ps_entry("qwen3:8b", 9)
        expected = [listed(gemma, "b"), listed(qwen, "a", "b")]
        self.assertEqual(listing, {"models": expected})
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "b.example:11435, a.example:11435")
        self.assertEqual(self.a.models, frozenset(), "a listing of running models is no inventory")

    def test_ps_with_nothing_running(self) -> None:
        _, listing = self.answer(b"/api/ps")
        self.assertEqual(listing, {"models": []})

    def test_openai_models_merged_in_their_shape(self) -> None:
        answer, listing = self.answer(b"/v1/models")
        self.assertEqual(list(listing), ["object", "data"])
        self.assertEqual(listing["object"], "list")
        self.assertEqual(
            [m["id"] for m in listing["data"]], ["qwen3:8b", "gemma3:1b", "llama3.2:latest"]
        )
        self.assertEqual(
            listing["data"][0],
            {"id": "qwen3:8b", "object": "model", "created": 0, "owned_by": "library"},
        )
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "b.example:11435, a.example:11435")

    def test_one_server_failing_gives_the_others_listing(self) -> None:
        self.servers.refusing.add(B)
        answer, listing = self.answer(b"/api/tags")
        names = [entry["name"] for entry in listing["models"]]
        self.assertEqual(names, ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435")

    def test_a_silent_server_is_waited_for_until_the_timeout(self) -> None:
        self.servers.hanging.add(B)
        d = self.ask(b"/v1/models")
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        answer = self.successResultOf(d)
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435")
        self.assertEqual(len(json.loads(answer.body)["data"]), 2)
        self.assertEqual(self.servers.cancelled, [B + "/v1/models"])

    def test_all_failing_is_upstreams_failed_naming_each_reason(self) -> None:
        self.servers.refusing.add(B)
        self.servers.ollamas[A].up = False
        self.assertEqual(
            self.failure(b"/api/tags", UpstreamsFailed),
            f"ollana: no server could answer: {B}: connection refused; "
            f"{A}: HTTP 500 from /api/tags",
        )

    def test_answers_that_are_no_listing_count_as_failures(self) -> None:
        self.servers.answers[A, "/api/ps"] = (200, {"error": "something else"})
        self.servers.answers[B, "/api/ps"] = (200, {"models": "none"})
        self.assertEqual(
            self.failure(b"/api/ps", UpstreamsFailed),
            f"ollana: no server could answer: {B}: no listing; {A}: no listing",
        )
        self.servers.answers[B, "/api/ps"] = (200, [{"name": "x"}])
        self.servers.hanging.add(A)
        d = self.ask(b"/api/ps")
        self.clock.advance(3)
        self.assertEqual(
            str(self.failureResultOf(d, UpstreamsFailed).value),
            f"ollana: no server could answer: {B}: no listing; {A}: no answer within 3 s",
        )

    def test_an_oversized_listing_leaves_the_others(self) -> None:
        oversized = {"models": [{"name": "big:latest"}], "pad": "x" * LISTING_LIMIT}
        self.servers.answers[B, "/api/tags"] = (200, oversized)
        answer, listing = self.answer(b"/api/tags")
        names = [entry["name"] for entry in listing["models"]]
        self.assertEqual(names, ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435")
        self.servers.refusing.add(A)
        self.assertEqual(
            self.failure(b"/api/tags", UpstreamsFailed),
            f"ollana: no server could answer: {B}: /api/tags gave an answer larger than "
            f"{LISTING_LIMIT} bytes; {A}: connection refused",
        )

    def test_a_listing_exactly_at_the_limit_is_merged(self) -> None:
        exact: dict[str, Any] = {"models": [ps_entry("big", 1)], "pad": ""}
        exact["pad"] = "x" * (LISTING_LIMIT - len(json.dumps(exact)))
        self.assertEqual(len(json.dumps(exact)), LISTING_LIMIT, "as FakeServers sends it")
        self.servers.answers[B, "/api/ps"] = (200, exact)
        _, listing = self.answer(b"/api/ps")
        self.assertEqual(listing, {"models": [listed(ps_entry("big", 1), "b")]})

    def test_each_server_gives_at_most_max_models(self) -> None:
        many = [ps_entry(f"m{i}:latest", 1) for i in range(MAX_MODELS + 10)]
        self.servers.answers[B, "/api/ps"] = (200, {"models": many})
        self.servers.answers[A, "/api/ps"] = (200, {"models": [ps_entry("qwen3:8b", 1)]})
        logs = capture_logs(self)
        _, listing = self.answer(b"/api/ps")
        self.assertEqual(listing, {"models": [*(listed(e, "b") for e in many[:MAX_MODELS]),
                                              listed(ps_entry("qwen3:8b", 1), "a")]})  # fmt: skip
        self.assertEqual(
            [formatEvent(e) for e in logs],
            [f"{B}/api/ps lists {MAX_MODELS + 10} entries; only the first {MAX_MODELS} are used"],
        )

    def test_the_inventory_from_tags_is_cut_too(self) -> None:
        many = [{"name": f"m{i}"} for i in range(MAX_MODELS + 1)]
        self.servers.answers[B, "/api/tags"] = (200, {"models": many})
        self.answer(b"/api/tags")
        self.assertEqual(len(self.b.models), MAX_MODELS)
        self.assertNotIn(f"m{MAX_MODELS}:latest", self.b.models)

    def test_entries_that_are_not_objects_are_left_out(self) -> None:
        self.servers.answers[B, "/api/ps"] = (200, {"models": [1, "x", None, ps_entry("a", 1)]})
        self.servers.refusing.add(A)
        _, listing = self.answer(b"/api/ps")
        self.assertEqual(listing, {"models": [listed(ps_entry("a", 1), "b")]})

    def test_entries_with_a_strange_name_are_kept_undeduplicated(self) -> None:
        odd = {"name": ["odd"]}
        self.servers.answers[B, "/api/ps"] = (200, {"models": [odd, odd]})
        self.servers.answers[A, "/api/ps"] = (200, {"models": [ps_entry("a", 1)]})
        answer, listing = self.answer(b"/api/ps")
        self.assertEqual(listing, {"models": [odd, odd, listed(ps_entry("a", 1), "a")]})
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "b.example:11435, a.example:11435")

    def test_no_server_is_no_upstream(self) -> None:
        pool = PeerPool(self.clock, ttl=15)
        listings = MergedListings(pool, self.servers, self.clock, timeout=3)
        listing = listings.lookup(b"GET", b"/api/tags")
        assert listing is not None
        self.assertEqual(str(self.failureResultOf(listing(), NoUpstream).value), NO_SERVER)
        pool.legacy_replied("198.18.0.9")
        self.assertEqual(str(self.failureResultOf(listing(), NoUpstream).value), ONLY_LEGACY)
        self.assertEqual(self.servers.asked, [])

    def test_legacy_servers_are_not_asked(self) -> None:
        self.pool.legacy_replied("198.18.0.9")
        self.answer(b"/api/tags")
        self.assertEqual([url for _, url in self.servers.asked if "198.18.0.9" in url], [])

    def test_only_healthy_servers_are_asked_while_there_are_some(self) -> None:
        self.pool.suspect(self.b, "connection reset")
        answer, _ = self.answer(b"/api/tags")
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435")
        self.assertEqual([url for _, url in self.servers.asked], [A + "/api/tags"])

    def test_with_no_healthy_server_all_are_asked(self) -> None:
        self.clock.advance(1)
        self.pool.check_succeeded(self.a, 0.5)
        self.pool.suspect(self.a, "connection reset")
        self.pool.suspect(self.b, "connection reset")
        answer, listing = self.answer(b"/api/tags")
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "a.example:11435, b.example:11435")
        self.assertEqual(len(listing["models"]), 3)

    def test_tags_refresh_the_servers_models(self) -> None:
        self.servers.ollamas[A].models = ["Llama3.2:latest", "qwen3:8b", "gemma3:1b"]
        self.servers.refusing.add(B)
        self.b.models = frozenset({"old:latest"})
        self.clock.advance(7)
        self.answer(b"/api/tags")
        self.assertEqual(self.a.models, frozenset({"llama3.2:latest", "qwen3:8b", "gemma3:1b"}))
        self.assertEqual(self.a.models_checked, START + 7)
        self.assertEqual((self.b.models, self.b.models_checked), (frozenset({"old:latest"}), None))

    def test_other_listings_leave_the_models_alone(self) -> None:
        self.answer(b"/v1/models")
        self.answer(b"/api/ps")
        self.assertEqual((self.a.models, self.a.models_checked), (frozenset(), None))

    def test_a_query_string_still_matches(self) -> None:
        answer, listing = self.answer(b"/api/tags?verbose=true&x=%2F")
        self.assertEqual(len(listing["models"]), 3)
        self.assertEqual(self.header(answer, b"x-ollana-peer"), "b.example:11435, a.example:11435")
        self.assertEqual(
            sorted(url for _, url in self.servers.asked), [A + "/api/tags", B + "/api/tags"]
        )
        self.assertIsNotNone(self.listings.lookup(b"GET", b"/v1/models?"))

    def test_only_get_of_the_three_paths(self) -> None:
        for method, target in [
            (b"POST", b"/api/tags"),
            (b"HEAD", b"/api/ps"),
            (b"PUT", b"/v1/models"),
            (b"GET", b"/api/version"),
            (b"GET", b"/api/tags/x"),
            (b"GET", b"/v1/models/qwen3:8b"),
            (b"GET", b"/api/TAGS"),
            (b"GET", b"/x/api/tags"),
        ]:
            self.assertIsNone(self.listings.lookup(method, target), (method, target))
        self.assertEqual(self.servers.asked, [])
