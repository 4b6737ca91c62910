"""The incremental scanner for the top-level "model" of a JSON request body."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ollana.modelscan import MAX_MODEL_CHARS, ModelScanner

CHUNK_SIZES: tuple[int | None, ...] = (1, 2, 3, 7, None)
"""Chunk sizes every body is fed in; None feeds it whole."""


def chunks(body: bytes, size: int | None) -> Iterator[bytes]:
    """Split body into chunks of one size, or not at all, to move the chunk boundaries."""
    if size is None:
        yield body
        return
    for start in range(0, len(body), size):
        yield body[start : start + size]


def scan(parts: Iterable[bytes], limit: int = 8 << 20) -> tuple[bool, str | None]:
    """Feed parts to a fresh scanner; whether it decided before end(), and its model."""
    scanner = ModelScanner(limit)
    early = False
    for part in parts:
        early = scanner.feed(part)
        if early:
            break
    scanner.end()
    assert scanner.decided
    return early, scanner.model


class ScanTestCase(SynchronousTestCase):
    def assertScans(
        self,
        body: bytes,
        model: str | None,
        early: bool = True,
        sizes: Sequence[int | None] = CHUNK_SIZES,
        limit: int = 8 << 20,
    ) -> None:
        """Every chunking of body gives model, decided before end() if early."""
        for size in sizes:
            self.assertEqual(
                scan(chunks(body, size), limit), (early, model), f"chunk size {size}: {body!r:.200}"
            )

    def assertFound(self, body: bytes, model: str, **kw: Any) -> None:
        """The scanner finds model in body, whatever the chunk boundaries."""
        self.assertScans(body, model, **kw)

    def assertNothing(self, body: bytes, early: bool = True, **kw: Any) -> None:
        """The scanner decides there is no model, before end() if early."""
        self.assertScans(body, None, early, **kw)


class FoundTests(ScanTestCase):
    def test_model_first(self) -> None:
        self.assertFound(b'{"model": "llama3.2", "prompt": "Why is the sky blue?"}', "llama3.2")

    def test_decides_when_the_value_is_complete(self) -> None:
        self.assertFound(b'{"model": "llama3.2", "prompt": "unterminated', "llama3.2")

    def test_model_last(self) -> None:
        body = b'{"prompt": "hi", "stream": false, "options": {"seed": 1}, "model": "qwen3:8b"}'
        self.assertFound(body, "qwen3:8b")

    def test_compact_and_spaced(self) -> None:
        self.assertFound(b'{"a":1,"model":"m"}', "m")
        self.assertFound(b'{\n  "a" : 1 ,\n  "model" \t:\r\n "m"\n}', "m")

    def test_bom_and_leading_whitespace(self) -> None:
        self.assertFound(b'\xef\xbb\xbf{"model": "m"}', "m")
        self.assertFound(b' \r\n\t {"model": "m"}', "m")
        self.assertFound(b'\xef\xbb\xbf \n{"model": "m"}', "m")

    def test_after_a_5mb_image(self) -> None:
        image = b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAcCBlCwAA"
        body = b'{"images": ["' + image * (5_000_000 // len(image)) + b'"], "model": "llava"}'
        self.assertGreater(len(body), 5_000_000)
        self.assertLess(len(body), 8 << 20)
        self.assertFound(body, "llava", sizes=(1 << 16, 4093, None))

    def test_nested_model_keys_are_ignored(self) -> None:
        body = (
            b'{"options": {"model": "no", "deeper": {"model": "no"}},'
            b' "messages": [{"role": "user", "model": "no"}, {"model": "no"}],'
            b' "list": ["model", {"model": "no"}, [["model"]]],'
            b' "model": "yes"}'
        )
        self.assertFound(body, "yes")

    def test_only_nested_model_keys(self) -> None:
        self.assertNothing(b'{"options": {"model": "no"}, "messages": [{"model": "no"}]}')

    def test_model_in_string_values_is_ignored(self) -> None:
        body = b'{"prompt": "model", "system": "{\\"model\\": \\"no\\"}", "model": "yes"}'
        self.assertFound(body, "yes")
        self.assertNothing(b'{"prompt": "model", "x": "\\"model\\": \\"no\\""}')

    def test_nested_strings_short_long_and_escaped(self) -> None:
        plain = '{"model": "no"} [model] '
        texts = [plain, "x" * 256, "x" * 257, plain * 20, plain + '\\"\\', '\\"' * 200 + "]}"]
        messages = [{"content": text} for text in texts]
        nested = json.dumps({"options": {"stop": texts}, "messages": messages})
        self.assertFound(nested[:-1].encode() + b', "model": "yes"}', "yes")
        self.assertNothing(nested.encode())

    def test_model_as_a_value_is_not_a_key(self) -> None:
        self.assertNothing(b'{"name": "model", "x": ["model", "m"]}')
        self.assertFound(b'{"name": "model", "model": "m"}', "m")

    def test_escaped_quotes_and_backslashes_before_the_key(self) -> None:
        body = (
            b'{"prompt": "say \\"hi\\" \\\\", "path": "C:\\\\", "x": "\\\\\\"",'
            b' "q": "\\u0022model\\u0022: \\"no\\"", "model": "yes"}'
        )
        self.assertEqual(json.loads(body)["model"], "yes")
        self.assertFound(body, "yes")

    def test_escapes_in_the_value(self) -> None:
        self.assertFound(b'{"model": "caf\\u00e9"}', "caf\u00e9")
        self.assertFound(b'{"model": "\\ud83e\\udd99:7b"}', "\U0001f999:7b")
        self.assertFound(b'{"model": "a\\"b\\\\c\\/d"}', 'a"b\\c/d')
        self.assertFound('{"model": "café"}'.encode(), "caf\u00e9")

    def test_escapes_in_the_key(self) -> None:
        self.assertFound(b'{"\\u006dodel": "m"}', "m")
        self.assertFound(b'{"mod\\u0065l": "m", "model": "other"}', "m")

    def test_similar_keys(self) -> None:
        self.assertNothing(b'{"models": "a", "Model": "b", "model ": "c", "modelmodel": "d"}')

    def test_long_keys_before_the_model(self) -> None:
        self.assertFound(
            b'{"' + b"k" * 1000 + b'": 1, "' + b"\\\\" * 100 + b'": 2, "model": "m"}', "m"
        )

    def test_first_model_key_wins(self) -> None:
        self.assertFound(b'{"model": "first", "model": "second"}', "first")

    def test_empty_name(self) -> None:
        self.assertFound(b'{"model": ""}', "")

    def test_longest_name(self) -> None:
        name = "m" * MAX_MODEL_CHARS
        self.assertFound(json.dumps({"model": name}).encode(), name, sizes=(1, 7, None))
        name = "\U0001f999" * MAX_MODEL_CHARS
        for ensure_ascii in (True, False):
            body = json.dumps({"model": name}, ensure_ascii=ensure_ascii).encode()
            self.assertFound(body, name, sizes=(1, 7, None))

    def test_exactly_at_the_limit(self) -> None:
        body = b'{"model": "m"}'
        self.assertFound(body, "m", limit=len(body) - 1)
        self.assertFound(body, "m", limit=len(b'{"model": "m"'))


class NothingTests(ScanTestCase):
    def test_no_model_key(self) -> None:
        self.assertNothing(b'{"prompt": "hi", "options": {"temperature": 0}}')
        self.assertNothing(b"{}")

    def test_decides_when_the_object_closes(self) -> None:
        self.assertNothing(b'{"prompt": "hi"} {"model": "m"}')

    def test_value_not_a_string(self) -> None:
        for value in (b"42", b"null", b"true", b'["m"]', b'{"name": "m"}', b"-1.5e3", b"m"):
            self.assertNothing(b'{"model": ' + value + b', "x": "m"}')

    def test_value_too_long(self) -> None:
        self.assertNothing(json.dumps({"model": "m" * (MAX_MODEL_CHARS + 1)}).encode())
        self.assertNothing(json.dumps({"model": "\u00e9" * (MAX_MODEL_CHARS + 1)}).encode())
        self.assertNothing(b'{"model": "' + b"m" * 10_000_000 + b'"}', sizes=(4096, None))

    def test_value_not_usable_text(self) -> None:
        self.assertNothing(b'{"model": "\\ud83e"}')
        self.assertNothing(b'{"model": "\\x41"}')
        self.assertNothing(b'{"model": "\xff\xfe"}')
        self.assertNothing(b'{"model": "a\nb"}')

    def test_invalid_json(self) -> None:
        self.assertNothing(b'{"model" "m"}')
        self.assertNothing(b'{"model", "m"}')
        self.assertNothing(b'{"model": , "m"}')
        self.assertNothing(b'{"a": 1]')
        self.assertNothing(b'{"a": "b" "model": "m"}')
        self.assertNothing(b'{model: "m"}')

    def test_incomplete_json(self) -> None:
        self.assertNothing(b'{"prompt": "hi", "model', early=False)
        self.assertNothing(b'{"model": ', early=False)
        self.assertNothing(b'{"model": "unterminated', early=False)
        self.assertNothing(b'{"options": {"model": "x"', early=False)
        self.assertNothing(b"  ", early=False)
        self.assertNothing(b"", early=False)

    def test_not_json_objects(self) -> None:
        for body, needed in (
            (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1),
            (b'["model", "m"]', 1),
            (b'"model"', 1),
            (b"model: m", 1),
            (b"\x00{", 1),
            (b" \n[{}]", 3),
            (b"\xef\xbb{}", 3),
        ):
            self.assertNothing(body)
            scanner = ModelScanner()
            decided = [scanner.feed(bytes([byte])) for byte in body[:needed]]
            self.assertEqual(decided, [False] * (needed - 1) + [True], body)

    def test_limit_exceeded(self) -> None:
        body = b'{"prompt": "' + b"x" * 100 + b'", "model": "m"}'
        self.assertNothing(body, limit=64)
        self.assertNothing(body, limit=len(body) - 2)
        self.assertFound(body, "m", limit=len(body))
        self.assertNothing(b"   ", limit=2)
        self.assertNothing(b" ", limit=2, early=False)

    def test_limit_must_be_positive(self) -> None:
        self.assertRaises(ValueError, ModelScanner, 0)


class LifecycleTests(SynchronousTestCase):
    def test_undecided_until_told(self) -> None:
        scanner = ModelScanner()
        self.assertFalse(scanner.decided)
        self.assertIsNone(scanner.model)
        self.assertFalse(scanner.feed(b'{"prompt": "hi", '))
        self.assertFalse(scanner.feed(b""))
        self.assertFalse(scanner.decided)

    def test_end_before_decision(self) -> None:
        scanner = ModelScanner()
        scanner.feed(b'{"prompt": "hi", "mod')
        scanner.end()
        self.assertTrue(scanner.decided)
        self.assertIsNone(scanner.model)
        self.assertTrue(scanner.feed(b'el": "m"}'))
        self.assertIsNone(scanner.model)

    def test_end_without_data(self) -> None:
        scanner = ModelScanner()
        scanner.end()
        self.assertTrue(scanner.decided)
        self.assertIsNone(scanner.model)

    def test_feeds_after_decision_are_ignored(self) -> None:
        scanner = ModelScanner()
        self.assertTrue(scanner.feed(b'{"model": "m", "x": '))
        self.assertEqual(scanner.model, "m")
        self.assertTrue(scanner.feed(b'"\x00\xff}}}]]] {"model": "other"}'))
        scanner.end()
        self.assertTrue(scanner.decided)
        self.assertEqual(scanner.model, "m")

    def test_feeds_after_no_model_are_ignored(self) -> None:
        scanner = ModelScanner()
        self.assertTrue(scanner.feed(b"{} "))
        self.assertTrue(scanner.feed(b'{"model": "m"}'))
        self.assertIsNone(scanner.model)


json_keys = st.one_of(st.just("model"), st.text(max_size=12))
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=20),
        st.sampled_from(["model", '"model": "no"', "\\", '\\"', "{[", "]}", "x" * 257]),
        st.builds(lambda text, n: (text + '"\\') * n, st.text(max_size=4), st.integers(40, 90)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(json_keys, children, max_size=4)
    ),
    max_leaves=12,
)
top_level = st.dictionaries(
    st.text(max_size=12).filter(lambda key: key != "model"), json_values, max_size=5
)
separators = st.sampled_from([(", ", ": "), (",", ":"), (" ,\n", " :\t")])
prefixes = st.sampled_from([b"", b" \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\t"])
chunkings = st.lists(st.integers(1, 16), min_size=1, max_size=6)


def serialise(
    obj: dict[str, Any], ensure_ascii: bool, sep: tuple[str, str], prefix: bytes
) -> bytes:
    """The object as a client might send it: JSON in UTF-8, maybe with a BOM or whitespace."""
    return prefix + json.dumps(obj, ensure_ascii=ensure_ascii, separators=sep).encode()


def split(body: bytes, sizes: list[int]) -> Iterator[bytes]:
    """Split body into chunks whose sizes cycle through sizes."""
    start = 0
    for size in itertools.cycle(sizes):
        if start >= len(body):
            return
        yield body[start : start + size]
        start += size


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        top_level,
        st.text(max_size=40),
        st.integers(0, 5),
        st.booleans(),
        separators,
        prefixes,
        chunkings,
    )
    def test_finds_the_top_level_model(
        self,
        obj: dict[str, Any],
        model: str,
        where: int,
        ensure_ascii: bool,
        sep: tuple[str, str],
        prefix: bytes,
        sizes: list[int],
    ) -> None:
        items = list(obj.items())
        items.insert(min(where, len(items)), ("model", model))
        body = serialise(dict(items), ensure_ascii, sep, prefix)
        self.assertEqual(scan(split(body, sizes)), (True, model))
        self.assertEqual(scan([body]), (True, model))

    @settings(max_examples=200, deadline=None)
    @given(top_level, st.booleans(), separators, prefixes, chunkings)
    def test_nothing_without_a_top_level_model(
        self,
        obj: dict[str, Any],
        ensure_ascii: bool,
        sep: tuple[str, str],
        prefix: bytes,
        sizes: list[int],
    ) -> None:
        body = serialise(obj, ensure_ascii, sep, prefix)
        self.assertEqual(scan(split(body, sizes)), (True, None))
        self.assertEqual(scan([body]), (True, None))
