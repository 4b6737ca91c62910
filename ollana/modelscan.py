"""Find the top-level "model" of a JSON request body as it streams in, without buffering it.

The proxy routes a request to a server that has the model before it forwards the body, so
it needs the model name early and cheaply. ModelScanner is fed the body chunk by chunk and
decides as soon as the top-level "model" string is complete, or as soon as it is clear that
there is no usable answer. It is deliberately lenient: it does not validate JSON, it only
tracks nesting depth, strings and escapes well enough to tell top-level keys apart. Strings
are skipped with bytes.find and structure with regex searches, so a multi-megabyte base64
image before the key costs a few C-level scans rather than a Python loop per byte.
"""

from __future__ import annotations

import json
import re

MAX_MODEL_CHARS = 1024
"""Longer "model" values are not model names; the scanner gives up on them."""

_MAX_KEY_RAW = 64
"""A key longer than this (as written, escapes included) cannot be "model", so is not kept."""

_MAX_VALUE_RAW = 12 * MAX_MODEL_CHARS
"""Any value written in more bytes than this decodes to more than MAX_MODEL_CHARS characters.

The most verbose spelling of one character is a surrogate pair of \\u escapes: 12 bytes.
"""

_BOM = b"\xef\xbb\xbf"
_QUOTE = ord('"')
_BRACE = ord("{")
_COLON = ord(":")
_COMMA = ord(",")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")

_TOP_LEVEL = re.compile(rb'["{}\[\],:]')
"""What matters between tokens of the top-level object: strings, nesting, key separators."""
_NESTED_SKIP = re.compile(rb'(?:[^"{}\[\]]+|"[^"\\]{0,256}")*')
"""What can be passed over deeper down: all but nesting and strings, and short plain strings.

Only nesting and strings matter below the top level, so arrays of numbers and the short
strings of chat messages are passed over in one match. Longer strings and strings with
escapes are left to the string scanner, whose bytes.find is faster on long runs.
"""
_NON_SPACE = re.compile(rb"[^ \t\n\r]")

# Where the scanner is between chunks.
_BEFORE_BOM = 0  # at the very start, possibly inside a UTF-8 byte order mark
_LEADING = 1  # skipping whitespace before the opening brace
_STRUCTURE = 2  # inside the object, between strings
_STRING = 3  # inside a string
_AFTER_KEY = 4  # after the top-level key "model", expecting a colon
_BEFORE_VALUE = 5  # after that colon, expecting the value

# What is kept of the string being scanned.
_SKIP = 0  # nothing: a value, a nested string or an overlong key
_KEY = 1  # a top-level key, to compare with "model"
_VALUE = 2  # the value of the top-level "model"


def _decode(raw: bytes) -> str | None:
    """Decode the raw contents of a JSON string; None if they are not valid JSON text."""
    try:
        value = json.loads('"' + raw.decode("utf-8") + '"')
    except ValueError:  # including UnicodeDecodeError
        return None
    return value if isinstance(value, str) else None


class ModelScanner:
    """Incrementally find the top-level "model" string of a JSON object body within a prefix."""

    decided: bool
    model: str | None

    def __init__(self, limit: int = 8 << 20) -> None:
        """Scan at most `limit` bytes, so a body without a usable key costs bounded work."""
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        self.decided = False
        self.model = None
        self._limit = limit
        self._scanned = 0
        self._state = _BEFORE_BOM
        self._bom_matched = 0
        self._depth = 0
        self._expect_key = False
        self._kind = _SKIP
        self._raw = bytearray()
        self._escaped = False

    def feed(self, data: bytes) -> bool:
        """Scan the next chunk; True once decided (then `model` is final and later feeds are ignored)."""  # noqa: E501
        if self.decided:
            return True
        stop = min(len(data), self._limit - self._scanned)
        pos = 0
        while pos < stop and not self.decided:
            state = self._state
            if state == _STRING:
                pos = self._string(data, pos, stop)
            elif state == _STRUCTURE:
                pos = self._structure(data, pos, stop)
            elif state == _BEFORE_BOM:
                pos = self._bom(data, pos, stop)
            else:
                pos = self._token(data, pos, stop)
        self._scanned += stop
        if not self.decided and self._scanned >= self._limit:
            self._decide(None)
        return self.decided

    def end(self) -> None:
        """The body is complete: decide now (model stays None if it was not found)."""
        if not self.decided:
            self._decide(None)

    def _decide(self, model: str | None) -> None:
        """Settle on an answer and drop the scanning state, which is no longer needed."""
        self.decided = True
        self.model = model
        self._raw = bytearray()

    def _bom(self, data: bytes, pos: int, stop: int) -> int:
        """Step over a UTF-8 byte order mark, which may be split across chunks."""
        if data[pos] == _BOM[self._bom_matched]:
            self._bom_matched += 1
            if self._bom_matched == len(_BOM):
                self._state = _LEADING
            return pos + 1
        if self._bom_matched:
            self._decide(None)  # a broken mark: not UTF-8 JSON
        else:
            self._state = _LEADING
        return pos

    def _token(self, data: bytes, pos: int, stop: int) -> int:
        """Skip whitespace, then check the one byte that the current state allows next."""
        match = _NON_SPACE.search(data, pos, stop)
        if match is None:
            return stop
        pos = match.start()
        byte = data[pos]
        state = self._state
        if state == _LEADING and byte == _BRACE:
            self._depth = 1
            self._expect_key = True
            self._state = _STRUCTURE
        elif state == _AFTER_KEY and byte == _COLON:
            self._state = _BEFORE_VALUE
        elif state == _BEFORE_VALUE and byte == _QUOTE:
            self._state = _STRING
            self._kind = _VALUE
            self._raw = bytearray()
        else:
            self._decide(None)  # not an object, a malformed key, or a value that is no string
        return pos + 1

    def _structure(self, data: bytes, pos: int, stop: int) -> int:
        """Jump to the next byte that can matter at the current depth and act on it."""
        if self._depth > 1:
            pos = self._nested(data, pos, stop)
            if pos == stop or self._depth > 1:
                return pos
        match = _TOP_LEVEL.search(data, pos, stop)
        if match is None:
            return stop
        pos = match.start()
        byte = data[pos]
        if byte == _QUOTE:
            self._state = _STRING
            self._kind = _KEY if self._expect_key else _SKIP
            self._expect_key = False
        elif byte in _OPEN:
            self._depth = 2
        elif byte in _CLOSE:
            self._decide(None)  # the object closed without a top-level "model"
        else:
            self._expect_key = byte == _COMMA
        return pos + 1

    def _nested(self, data: bytes, pos: int, stop: int) -> int:
        """Pass over nested values until back at the top level, a long string or the chunk end."""
        depth = self._depth
        while depth > 1:
            skipped = _NESTED_SKIP.match(data, pos, stop)  # always matches, maybe nothing
            pos = skipped.end() if skipped else pos
            if pos == stop:
                break
            byte = data[pos]
            pos += 1
            if byte == _QUOTE:
                self._state = _STRING
                self._kind = _SKIP
                break
            depth += 1 if byte in _OPEN else -1
        self._depth = depth
        return pos

    def _string(self, data: bytes, pos: int, stop: int) -> int:
        """Jump over string contents to the closing quote, honouring escapes across chunks."""
        start = pos
        if self._escaped:
            self._escaped = False
            pos += 1  # the byte after a backslash that ended the previous chunk
        quote = data.find(b'"', pos, stop)
        while True:
            backslash = data.find(b"\\", pos, stop if quote < 0 else quote)
            if backslash < 0:
                break
            if backslash + 1 == stop:
                self._escaped = True
                break
            pos = backslash + 2
            if 0 <= quote < pos:
                quote = data.find(b'"', pos, stop)  # that quote was escaped
        if quote < 0:
            self._keep(data, start, stop)
            return stop
        self._keep(data, start, quote)
        if not self.decided:
            self._close_string()
        return quote + 1

    def _keep(self, data: bytes, start: int, end: int) -> None:
        """Add string contents to the key or value being collected, within their bounds."""
        if self._kind == _SKIP or start == end:
            return
        if len(self._raw) + end - start > (_MAX_KEY_RAW if self._kind == _KEY else _MAX_VALUE_RAW):
            if self._kind == _KEY:
                self._kind = _SKIP
                self._raw = bytearray()
            else:
                self._decide(None)
            return
        self._raw += data[start:end]

    def _close_string(self) -> None:
        """Act on a complete string: a top-level key may be "model", its value is the answer."""
        kind, raw = self._kind, bytes(self._raw)
        self._kind = _SKIP
        self._raw = bytearray()
        if kind == _KEY and (raw == b"model" or (b"\\" in raw and _decode(raw) == "model")):
            self._state = _AFTER_KEY
        elif kind == _VALUE:
            self._decide(_usable(_decode(raw)))
        else:
            self._state = _STRUCTURE


def _usable(model: str | None) -> str | None:
    """The model name if it can be one: not too long and encodable (no lone surrogates)."""
    if model is None or len(model) > MAX_MODEL_CHARS:
        return None
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return model
