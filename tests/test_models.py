"""Model management through a client in front of two servers (tests.support.memnet): blobs and
create, pull, copy, delete and show behave as they do against one Ollama; the merged
/api/tags says which server has what; a 404 for a model no server has names the servers
asked. The requests are those ollama-python and the ollama CLI send."""

from __future__ import annotations

import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase

from ollana.listings import SERVERS_FIELD
from ollana.management import (
    BlobHomes,
    create_digests,
    digest_of,
    merged_answer,
    with_note,
)
from ollana.upstream import Sent, Upstream
from tests.support.fakes import capture_logs
from tests.support.memnet import ServerNode, TwoServersCase

A, B = "127.0.0.11", "127.0.0.12"
PEER_A, PEER_B = f"{A}:11435", f"{B}:11435"
BLOB = b"GGUF, as far as a simulated Ollama can tell"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class LAN(TwoServersCase):
    """Two servers (alpha and shared on A, beta and shared on B) and a client."""

    a_models = ["alpha:latest", "shared:latest"]
    b_models = ["beta:latest", "shared:latest"]

    def has(self, server: ServerNode, model: str) -> bool:
        return server.fake.has(model)


class BlobAndCreateTests(LAN):
    def test_create_from_a_pushed_blob(self) -> None:
        """As ``ollama create`` and ollama-python do it: HEAD the blob (404), push it, HEAD
        again (200), create with files: all on one server, where the model then is."""
        blob = f"/api/blobs/{DIGEST}"
        self.assertEqual(self.call(b"HEAD", blob).status, 404)
        pushed = self.call(b"POST", blob, BLOB)
        self.assertEqual(pushed.status, 201)
        home = self.a if pushed.peer == PEER_A else self.b
        for _ in range(3):
            self.assertEqual((self.call(b"HEAD", blob).status, pushed.peer), (200, pushed.peer))
        create = {"model": "mine", "files": {"mine.gguf": DIGEST}, "stream": True}
        created = self.call(b"POST", "/api/create", create)
        self.assertEqual((created.status, created.peer), (200, pushed.peer), created.body)
        self.assertEqual(created.lines()[-1], {"status": "success"})
        self.assertTrue(self.has(home, "mine"))
        shown = self.call(b"POST", "/api/show", {"model": "mine"})
        self.assertEqual((shown.status, shown.peer), (200, pushed.peer))
        answer = self.call(b"POST", "/api/generate", {"model": "mine", "prompt": "hi there",
                                                      "stream": False})  # fmt: skip
        self.assertEqual((answer.status, answer.peer), (200, pushed.peer))
        tags = self.call(b"GET", "/api/tags").json()["models"]
        listed = {m["name"]: m[SERVERS_FIELD] for m in tags}
        self.assertEqual(listed["mine:latest"], [pushed.peer])

    def test_the_blob_s_server_is_remembered(self) -> None:
        """A blob pushed to B (chosen by header) is asked for there, and the create that
        names it goes there, though requests that name no model go to A."""
        blob = f"/api/blobs/{DIGEST}"
        chosen = {b"x-ollana-server": PEER_B.encode()}
        self.assertEqual(self.call(b"POST", blob, BLOB, chosen).peer, PEER_B)
        self.assertEqual(self.call(b"GET", "/api/version").peer, PEER_A, "the stable choice")
        head = self.call(b"HEAD", blob)
        self.assertEqual((head.status, head.peer), (200, PEER_B))
        create = {"model": "mine", "files": {"a.gguf": DIGEST}, "stream": False}
        created = self.call(b"POST", "/api/create", create)
        self.assertEqual((created.status, created.peer), (200, PEER_B), created.body)
        self.assertEqual(created.json(), {"status": "success"})
        self.assertTrue(self.has(self.b, "mine"))
        self.assertFalse(self.has(self.a, "mine"))

    def test_create_from_a_model_goes_where_the_model_is(self) -> None:
        created = self.call(b"POST", "/api/create", {"model": "mybeta", "from": "beta"})
        self.assertEqual((created.status, created.peer), (200, PEER_B), created.body)
        self.assertTrue(self.has(self.b, "mybeta"))

    def test_a_blob_unknown_everywhere(self) -> None:
        create = {"model": "x", "files": {"x.gguf": DIGEST}, "stream": False}
        created = self.call(b"POST", "/api/create", create)
        self.assertEqual(created.status, 400)
        self.assertIn("blob not found", created.json()["error"])

    def test_an_unknown_chosen_server(self) -> None:
        reply = self.call(b"POST", "/api/pull", {"model": "gamma"},
                          {b"x-ollana-server": b"127.0.0.99:11435"})  # fmt: skip
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.header(b"x-ollana-error"), "refused")
        self.assertIn(f"known: {PEER_A}, {PEER_B}", reply.json()["error"])


class PullTests(LAN):
    def test_pull_goes_where_the_strategy_would(self) -> None:
        pulled = self.call(b"POST", "/api/pull", {"model": "gamma", "stream": True})
        self.assertEqual(pulled.status, 200)
        self.assertEqual(pulled.lines()[-1], {"status": "success"})
        home, other = (self.a, self.b) if pulled.peer == PEER_A else (self.b, self.a)
        self.assertEqual((self.has(home, "gamma"), self.has(other, "gamma")), (True, False))
        for path, body in (("/api/show", {"model": "gamma"}),
                           ("/api/generate", {"model": "gamma", "prompt": "hi", "stream": False}),
                           ("/api/embed", {"model": "gamma", "input": "hi"})):  # fmt: skip
            reply = self.call(b"POST", path, body)
            self.assertEqual((reply.status, reply.peer), (200, pulled.peer), path)

    def test_pull_of_a_model_a_server_has_goes_there(self) -> None:
        pulled = self.call(b"POST", "/api/pull", {"model": "beta", "stream": False})
        self.assertEqual((pulled.status, pulled.peer), (200, PEER_B))

    def test_pull_to_a_chosen_server(self) -> None:
        for peer, server in ((PEER_B, self.b), (A, self.a)):  # HOST:PORT, or the host alone
            pulled = self.call(b"POST", "/api/pull", {"model": "delta", "stream": False},
                               {b"x-ollana-server": peer.encode()})  # fmt: skip
            self.assertEqual((pulled.status, pulled.peer), (200, server.host + ":11435"))
            self.assertTrue(self.has(server, "delta"))

    def test_pull_to_all_servers(self) -> None:
        """The progress is the first server's; the others pull too, and the log says how
        that ended."""
        logs = capture_logs(self)
        pulled = self.call(b"POST", "/api/pull", {"model": "gamma"},
                           {b"x-ollana-servers": b"all"})  # fmt: skip
        self.assertEqual(pulled.status, 200)
        self.assertEqual(pulled.lines()[-1], {"status": "success"})
        self.network.run_until(lambda: self.has(self.a, "gamma") and self.has(self.b, "gamma"), 5)
        self.assertTrue(self.has(self.a, "gamma") and self.has(self.b, "gamma"))
        other = PEER_B if pulled.peer == PEER_A else PEER_A
        self.assertIn(f"Pulled gamma on {other}", [e.get("log_format", "").format(**e)
                                                   for e in logs])  # fmt: skip
        tags = self.call(b"GET", "/api/tags").json()["models"]
        self.assertEqual({m["name"]: m[SERVERS_FIELD] for m in tags}["gamma:latest"],
                         [PEER_A, PEER_B])  # fmt: skip

    def test_a_pull_that_fails(self) -> None:
        self.a.fake.library = self.b.fake.library = set()
        pulled = self.call(b"POST", "/api/pull", {"model": "nowhere", "stream": False})
        self.assertEqual(pulled.status, 500)
        self.assertIn("file does not exist", pulled.json()["error"])


class CopyDeleteTests(LAN):
    def test_copy_on_every_server_that_has_the_model(self) -> None:
        copied = self.call(b"POST", "/api/copy", {"source": "shared", "destination": "mine"})
        self.assertEqual((copied.status, copied.body), (200, b""))
        self.assertEqual(sorted(str(copied.peer).split(", ")), [PEER_A, PEER_B])
        self.assertTrue(self.has(self.a, "mine") and self.has(self.b, "mine"))
        copied = self.call(b"POST", "/api/copy", {"source": "alpha", "destination": "a2"})
        self.assertEqual((copied.status, copied.peer), (200, PEER_A))
        self.assertEqual((self.has(self.a, "a2"), self.has(self.b, "a2")), (True, False))
        shown = self.call(b"POST", "/api/show", {"model": "a2"})
        self.assertEqual((shown.status, shown.peer), (200, PEER_A))

    def test_copy_of_a_model_no_server_has(self) -> None:
        copied = self.call(b"POST", "/api/copy", {"source": "nope", "destination": "x"})
        self.assertEqual(copied.status, 404)
        note = f"ollana: no server has it; asked {PEER_A}, {PEER_B}"
        self.assertEqual(copied.json(), {"error": f'model "nope" not found ({note})'})
        self.assertEqual([m for m in ("x",) if self.has(self.a, m) or self.has(self.b, m)], [])

    def test_delete_on_every_server_that_has_the_model(self) -> None:
        deleted = self.call(b"DELETE", "/api/delete", {"model": "shared"})
        self.assertEqual((deleted.status, deleted.body), (200, b""))
        self.assertFalse(self.has(self.a, "shared") or self.has(self.b, "shared"))
        again = self.call(b"DELETE", "/api/delete", {"model": "shared"})
        self.assertEqual(again.status, 404)
        self.assertEqual(again.json()["error"], "model 'shared' not found (ollana: no server "
                                                f"has it; asked {PEER_A}, {PEER_B})")  # fmt: skip
        shown = self.call(b"POST", "/api/show", {"model": "shared"})
        self.assertEqual(shown.status, 404)
        first = PEER_B if shown.peer == PEER_A else PEER_A  # the one asked before
        note = f"ollana: no server has it; asked {first}, {shown.peer}"
        self.assertEqual(shown.json()["error"], f"model 'shared' not found ({note})")
        tags = [m["name"] for m in self.call(b"GET", "/api/tags").json()["models"]]
        self.assertEqual(sorted(tags), ["alpha:latest", "beta:latest"])

    def test_delete_where_only_one_has_it(self) -> None:
        deleted = self.call(b"DELETE", "/api/delete", {"model": "beta"})
        self.assertEqual((deleted.status, deleted.peer), (200, PEER_B))
        self.assertFalse(self.has(self.b, "beta"))
        self.assertEqual([r for r in self.a.fake.requests if r[1] == "/api/delete"], [])

    def test_a_server_that_cannot_answer(self) -> None:
        """200 if any server succeeded; a 404 is never given when a server did not say."""
        self.b.fake.up = False  # answers 500 everywhere
        deleted = self.call(b"DELETE", "/api/delete", {"model": "shared"})
        self.assertEqual((deleted.status, deleted.peer), (200, PEER_A))
        deleted = self.call(b"DELETE", "/api/delete", {"model": "shared"})
        self.assertEqual(deleted.status, 500, "not 404: B may have it")

    def test_bad_requests_are_ollama_s_to_answer(self) -> None:
        for body in (b"", b"{}", b"not json"):
            reply = self.call(b"DELETE", "/api/delete", body)
            self.assertEqual(reply.status, 400, body)


class ByModelTests(LAN):
    def test_show_and_embeddings_go_by_model(self) -> None:
        for path, model, peer in (("/api/show", "beta", PEER_B), ("/api/embed", "alpha", PEER_A),
                                  ("/api/embeddings", "beta", PEER_B)):  # fmt: skip
            reply = self.call(b"POST", path, {"model": model, "input": "x", "prompt": "x"})
            self.assertEqual((reply.status, reply.peer), (200, peer), path)

    def test_a_model_no_server_has_is_asked_of_each(self) -> None:
        """The model lists may be late: each server is asked, and the 404 names them."""
        reply = self.call(b"POST", "/api/generate", {"model": "nope", "prompt": "hi"})
        self.assertEqual(reply.status, 404)
        first = PEER_B if reply.peer == PEER_A else PEER_A  # the one asked before
        self.assertEqual(reply.json(), {"error": "model 'nope' not found (ollana: no server has "
                                                 f"it; asked {first}, {reply.peer})"})  # fmt: skip
        for server in (self.a, self.b):
            self.assertIn(("POST", "/api/generate"), server.fake.requests)

    def test_a_model_a_server_has_but_its_list_does_not_say(self) -> None:
        self.b.fake.add("late")  # pulled there behind the client's back
        for _ in range(4):
            reply = self.call(b"POST", "/api/show", {"model": "late"})
            self.assertEqual((reply.status, reply.peer), (200, PEER_B))

    def test_a_404_for_a_listed_model_is_relayed_as_it_is(self) -> None:
        self.a.fake.remove("alpha")  # the client's list of A still has it
        reply = self.call(b"POST", "/api/show", {"model": "alpha"})
        self.assertEqual((reply.status, reply.json()), (404, {"error": "model 'alpha' not found"}))


class ManagementPiecesTests(SynchronousTestCase):
    def test_blob_homes_forget_the_least_recently_used(self) -> None:
        homes = BlobHomes(size=2)
        homes.remember("a", "s1")
        homes.remember("b", "s2")
        self.assertEqual(homes.home("a"), "s1")  # used: b is now the oldest
        homes.remember("c", "s1")
        self.assertEqual((homes.home("a"), homes.home("b"), homes.home("c")), ("s1", None, "s1"))

    def test_digests(self) -> None:
        hexdigest = "Ab" * 32
        self.assertEqual(digest_of(f"sha256:{hexdigest}"), hexdigest.lower())
        self.assertEqual(digest_of(f"sha256-{hexdigest}"), hexdigest.lower())
        for bad in ("sha256:abc", f"md5:{hexdigest}", f"sha256:{hexdigest}x", ""):
            self.assertIsNone(digest_of(bad), bad)
        request = {"files": {"a": f"sha256:{hexdigest}", "b": "nonsense"},
                   "adapters": {"c": f"sha256:{'0' * 64}"}}  # fmt: skip
        self.assertEqual(create_digests(request), [hexdigest.lower(), "0" * 64])
        self.assertEqual(create_digests({"files": ["a"]}), [])

    def test_notes(self) -> None:
        noted = json.loads(with_note(b'{"error": "gone"}', "why"))
        self.assertEqual(noted, {"error": "gone (why)"})
        for body in (b"404 page not found", b"[]", b'{"error": 1}'):
            self.assertEqual(with_note(body, "why"), body)

    def test_merged_answers(self) -> None:
        a, b = Upstream("http://a:1", "a:1"), Upstream("http://b:1", "b:1")
        gone = b'{"error":"gone"}'
        json_type = b"application/json; charset=utf-8"
        both_404 = merged_answer([Sent(a, 404, json_type, gone), Sent(b, 404, json_type, gone)])
        note = "ollana: no server has it; asked a:1, b:1"
        self.assertEqual((both_404.code, json.loads(both_404.body)),
                         (404, {"error": f"gone ({note})"}))  # fmt: skip
        one_ok = merged_answer([Sent(a, 404, json_type, gone), Sent(b, 200, None, b"")])
        self.assertEqual((one_ok.code, dict(one_ok.headers)[b"x-ollana-peer"]), (200, b"b:1"))
        unreachable = merged_answer([Sent(a, 404, json_type, gone), Sent(b, error="refused")])
        self.assertEqual((unreachable.code, json.loads(unreachable.body)["error"]),
                         (502, "ollana: no server could answer: http://a:1: HTTP 404; "
                               "http://b:1: refused"), "b may have it")  # fmt: skip
        failed = merged_answer([Sent(a, 404, json_type, gone), Sent(b, 500, json_type, b"{}")])
        self.assertEqual((failed.code, dict(failed.headers)[b"x-ollana-peer"]), (500, b"b:1"))
        none = merged_answer([Sent(a, error="refused"), Sent(b, error="timed out")])
        self.assertEqual((none.code, json.loads(none.body)["error"]),
                         (502, "ollana: no server could answer: http://a:1: refused; "
                               "http://b:1: timed out"))  # fmt: skip
