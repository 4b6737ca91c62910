"""The proxy's message policy: which headers pass a hop (end-to-end ones do; hop-by-hop
ones and those Connection names do not), which request-targets it can pass on, and the
error answers it makes itself, in Ollama's own shape (and what kind of error an Ollana
server says an answer of its own is).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ollana.httpclient import connection_tokens
from ollana.upstream import ERROR_HEADER

# Hop-by-hop headers (RFC 9110 7.6.1), plus the framing that each side sets itself and
# Expect, which twisted.web already answered with 100 Continue.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
    }
)
VIA = b"1.1 ollana"
MISSING_PHRASES = {431: b"Request Header Fields Too Large"}  # not in twisted.web's table


def end_to_end(headers: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """The headers a proxy passes on: all but hop-by-hop ones and those Connection names."""
    named = connection_tokens(headers)
    dropped = HOP_BY_HOP | named if named else HOP_BY_HOP
    passed = []
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered not in dropped and not lowered.startswith(b"proxy-"):
            passed.append((name, values))
    return passed


class BadTarget(Exception):
    """The request-target is not one we can pass on."""


def origin_form(target: bytes) -> bytes:
    """The path and query of a request-target, also from the absolute form proxies get."""
    if target.startswith(b"/"):
        return target
    for scheme in (b"http://", b"https://"):
        if target.lower().startswith(scheme):
            rest = target[len(scheme) :]
            start = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            if start < 0:
                return b"/"
            return rest[start:] if rest[start : start + 1] == b"/" else b"/" + rest[start:]
    raise BadTarget(f"ollana: cannot proxy the request-target {target[:100]!r}")


def error_body(message: str) -> bytes:
    """An error in Ollama's own shape, which Ollama clients print."""
    return json.dumps({"error": message}).encode("utf-8") + b"\n"


def error_response(code: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for answers given
    before twisted.web would (before the body, or instead of a request)."""
    body = error_body(message)
    phrase = RESPONSES.get(code) or MISSING_PHRASES.get(code, b"Error")
    added = b"".join(b"%s: %s\r\n" % header for header in headers)
    return (
        b"HTTP/1.1 %d %s\r\n%sContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (code, phrase, added, len(body))
    ) + body


def error_kind(response: IResponse) -> str | None:
    """What an Ollana server says went wrong in an answer of its own (ERROR_HEADER)."""
    kinds = response.headers.getRawHeaders(ERROR_HEADER)
    return kinds[-1].strip().lower().decode("ascii", "replace") if kinds else None
