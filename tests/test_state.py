"""The state report a server sends with its answers (X-Ollana-State), signed or not."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ollana.interfaces import IServerState
from ollana.state import (
    DEFAULT_MAX_LOADED,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PARALLEL,
    MAX_MODELS,
    MAX_STATE_HEADER,
    ServerState,
    decode,
    encode,
)

SECRET = b"correct horse battery staple"
STATE = ServerState(
    parallel=2,
    max_queue=8,
    max_loaded=1,
    loaded=frozenset({"llama3.2:latest"}),
    models={"llama3.2:latest": (3, 1), "qwen3:8b": (1, 1)},
)


def report(**changes: object) -> bytes:
    """An unsigned header value: STATE's, with some fields changed (or removed: None)."""
    fields: dict[str, object] = json.loads(encode(STATE))
    for name, value in changes.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    return json.dumps(fields).encode("ascii")


class ServerStateTests(SynchronousTestCase):
    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IServerState, ServerState()))
        self.assertTrue(verifyObject(IServerState, STATE))

    def test_ollamas_defaults(self) -> None:
        empty = ServerState()
        self.assertEqual(
            (empty.parallel, empty.max_queue, empty.max_loaded, empty.loaded),
            (DEFAULT_PARALLEL, DEFAULT_MAX_QUEUE, DEFAULT_MAX_LOADED, frozenset()),
        )
        self.assertEqual((DEFAULT_PARALLEL, DEFAULT_MAX_QUEUE, DEFAULT_MAX_LOADED), (1, 512, 3))
        self.assertEqual(empty.busy(), 0)

    def test_counts_per_model(self) -> None:
        self.assertEqual((STATE.in_flight("llama3.2:latest"), STATE.waiting("llama3.2:latest")),
                         (3, 1))  # fmt: skip
        self.assertEqual((STATE.in_flight("qwen3:8b"), STATE.waiting("qwen3:8b")), (1, 1))
        self.assertEqual((STATE.in_flight("gemma3:1b"), STATE.waiting("gemma3:1b")), (0, 0))
        self.assertEqual(STATE.busy(), 4)


class EncodingTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(decode(encode(STATE)), STATE)
        self.assertEqual(decode(encode(ServerState())), ServerState())

    def test_compact_json(self) -> None:
        value = encode(STATE)
        self.assertNotIn(b" ", value)
        self.assertEqual(
            json.loads(value),
            {"n": 2, "q": 8, "m": 1, "loaded": ["llama3.2:latest"],
             "models": {"llama3.2:latest": [3, 1], "qwen3:8b": [1, 1]}},
        )  # fmt: skip

    def test_signed_round_trip(self) -> None:
        value = encode(STATE, SECRET)
        body, sep, tag = value.rpartition(b";")
        self.assertEqual((body, sep), (encode(STATE), b";"))
        self.assertEqual(len(tag), 64)
        int(tag, 16)  # hex
        self.assertEqual(decode(value, SECRET), STATE)

    def test_the_tag_depends_on_the_secret_and_the_report(self) -> None:
        tag = encode(STATE, SECRET).rpartition(b";")[2]
        self.assertNotEqual(encode(STATE, b"other").rpartition(b";")[2], tag)
        self.assertNotEqual(encode(ServerState(), SECRET).rpartition(b";")[2], tag)

    def test_a_wrong_secret_is_no_report(self) -> None:
        self.assertIsNone(decode(encode(STATE, SECRET), b"another secret"))

    def test_a_tampered_report_is_no_report(self) -> None:
        value = encode(STATE, SECRET)
        self.assertIn(b"[3,1]", value)
        self.assertIsNone(decode(value.replace(b"[3,1]", b"[0,0]"), SECRET))
        body, _, tag = value.rpartition(b";")
        flipped = (b"0" if tag[:1] != b"0" else b"1") + tag[1:]
        self.assertIsNone(decode(body + b";" + flipped, SECRET))
        self.assertIsNone(decode(body + b";" + tag[:-1], SECRET), "a short tag")
        self.assertIsNone(decode(body + b";" + tag.upper(), SECRET), "not the tag's spelling")
        self.assertIsNone(decode(value + b";" + tag, SECRET))

    def test_an_unsigned_report_is_none_when_a_secret_is_expected(self) -> None:
        self.assertIsNone(decode(encode(STATE), SECRET))
        self.assertIsNone(decode(encode(STATE) + b";", SECRET))
        self.assertIsNone(decode(b"", SECRET))

    def test_a_signed_report_is_none_without_the_secret(self) -> None:
        self.assertIsNone(decode(encode(STATE, SECRET)))

    def test_an_oversized_value_is_no_report(self) -> None:
        name = "x" * MAX_STATE_HEADER
        big = ServerState(loaded=frozenset({name}))
        self.assertGreater(len(encode(big)), MAX_STATE_HEADER)
        self.assertIsNone(decode(encode(big)))
        self.assertIsNone(decode(encode(big, SECRET), SECRET))
        padded = encode(STATE) + b" " * (MAX_STATE_HEADER - len(encode(STATE)))
        self.assertEqual(decode(padded), STATE, "up to the limit, a report")
        self.assertIsNone(decode(padded + b" "))

    def test_junk_is_no_report(self) -> None:
        for value in [
            b"",
            b"{",
            b"null",
            b"[]",
            b"42",
            b'"n"',
            b"\xff\xfe{}",
            b"n=1; q=2",
            b"[" * 5000,  # nested too deep for the parser's recursion
            b'{"n": 1, "q": 2, "m": 3, "loaded": [], "models": ' + b"[" * 5000,
            report(n=None),
            report(q=None),
            report(m=None),
            report(loaded=None),
            report(models=None),
            report(loaded="llama3.2:latest"),
            report(loaded={"llama3.2:latest": 1}),
            report(models=["llama3.2:latest"]),
            report(models=5),
            report(models={"llama3.2:latest": 3}),
            report(models={"llama3.2:latest": [3]}),
            report(models={"llama3.2:latest": []}),
            report(models={"llama3.2:latest": "31"}),
        ]:
            self.assertIsNone(decode(value), value[:80])

    def test_counts_must_be_whole_numbers_in_range(self) -> None:
        bad: list[dict[str, object]] = [
            {"n": 0},
            {"n": -1},
            {"n": True},
            {"n": 1.5},
            {"n": "2"},
            {"q": -1},
            {"q": False},
            {"q": 8.0},
            {"m": 0},
            {"m": True},
            {"models": {"llama3.2:latest": [-1, 0]}},
            {"models": {"llama3.2:latest": [1, -1]}},
            {"models": {"llama3.2:latest": [True, 0]}},
            {"models": {"llama3.2:latest": [1, 1.0]}},
            {"models": {"llama3.2:latest": [1, "0"]}},
            {"models": {"llama3.2:latest": [1, 0], "qwen3:8b": [None, 0]}},
        ]
        for changes in bad:
            self.assertIsNone(decode(report(**changes)), changes)
        zero_queue = decode(report(q=0))
        assert zero_queue is not None
        self.assertEqual(zero_queue.max_queue, 0, "a queue of none is Ollama's to say")

    def test_names_that_are_not_strings_are_left_out(self) -> None:
        state = decode(report(loaded=["llama3.2:latest", 7, None, ["x"], "qwen3:8b"]))
        assert state is not None
        self.assertEqual(state.loaded, frozenset({"llama3.2:latest", "qwen3:8b"}))

    def test_too_many_models_are_capped(self) -> None:
        names = [f"model{n:04d}:latest" for n in range(MAX_MODELS + 50)]
        many = ServerState(loaded=frozenset(names), models={name: (1, 0) for name in names})
        sent = json.loads(encode(many))
        self.assertEqual((len(sent["loaded"]), len(sent["models"])), (MAX_MODELS, MAX_MODELS))
        state = decode(encode(many))
        assert state is not None
        self.assertEqual((len(state.loaded), len(state.models)), (MAX_MODELS, MAX_MODELS))
        self.assertEqual(state.busy(), MAX_MODELS)
        # A report made elsewhere, with more than that: the same cap on the way in.
        state = decode(report(loaded=names, models={name: [1, 1] for name in names}))
        assert state is not None
        self.assertEqual((len(state.loaded), len(state.models)), (MAX_MODELS, MAX_MODELS))
