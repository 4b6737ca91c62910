"""Model management through a client: which server holds each blob pushed through it, what
a management request's body names (digests, models), copies of a request sent to several
servers, and one answer made of theirs, as one Ollama would give it.

PoolRouter (ollana.routing) decides where each management request goes; this module holds
the pieces it and the exchange need that are not routing: pure functions, and ``Copies``,
which sends a copy of a request with its whole body and reads the end of the answer.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ollana.upstream import LocalAnswer, Sent, Upstream, describe_error

BLOB_MEMORY = 1024  # digests whose server a client remembers (least recently used forgotten)
ANSWER_TAIL = 64 * 1024  # bytes kept of the answer to a copy (a pull's progress is long)
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})", re.IGNORECASE)
JSON_TYPE = b"application/json; charset=utf-8"


def digest_of(text: str) -> str | None:
    """The hex SHA-256 a blob's name (``sha256:<hex>``, or Ollama's ``sha256-<hex>``) gives."""
    found = _DIGEST.fullmatch(text.strip())
    return found.group(1).lower() if found is not None else None


class BlobHomes:
    """The server each blob digest was pushed to (or found on) through this client, for the
    BLOB_MEMORY digests used last."""

    def __init__(self, size: int = BLOB_MEMORY) -> None:
        self.size = size
        self._homes: OrderedDict[str, str] = OrderedDict()  # digest: the server's pool key

    def remember(self, digest: str, server: str) -> None:
        self._homes[digest] = server
        self._homes.move_to_end(digest)
        if len(self._homes) > self.size:
            self._homes.popitem(last=False)

    def home(self, digest: str) -> str | None:
        """The key of the server holding digest, if one is known."""
        server = self._homes.get(digest)
        if server is not None:
            self._homes.move_to_end(digest)
        return server


def request_json(body: bytes | None) -> dict[str, object]:
    """A request body's JSON object, or {} when it is none."""
    if not body:
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def named_model(request: Mapping[str, object], *keys: str) -> str | None:
    """The model a management request names under the first of keys that has a string
    (Ollama still takes "name" where "model" is now meant)."""
    for key in keys:
        value = request.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def create_digests(request: Mapping[str, object]) -> list[str]:
    """The blob digests a create request's ``files`` and ``adapters`` name."""
    digests = []
    for key in ("files", "adapters"):
        named = request.get(key)
        if isinstance(named, dict):
            digests += [d for d in map(digest_of, map(str, named.values())) if d is not None]
    return digests


def with_note(body: bytes, note: str) -> bytes:
    """An Ollama error answer (``{"error": "..."}``) with note added to its message; the
    body as it was if it is not one."""
    answer = request_json(body)
    message = answer.get("error")
    if not isinstance(message, str):
        return body
    return json.dumps({**answer, "error": f"{message} ({note})"}).encode("utf-8")


def not_found_note(asked: Sequence[str]) -> str:
    """What a 404 for a model that no server has says of it."""
    return "ollana: no server has it; asked " + ", ".join(asked)


def merged_answer(results: Sequence[Sent]) -> LocalAnswer:
    """One answer from those of every server a delete or copy went to, as one Ollama would
    give it: the first success, if any server succeeded; a 404 when every server said 404
    (naming them); else the first answer that is not a 404 (a 400, a 500), or a 502 when
    the only answers were 404s and some servers gave none (they may have the model)."""
    answered = [r for r in results if r.code is not None]
    ok = [r for r in answered if 200 <= r.code < 300]  # type: ignore[operator]
    if ok:
        return _relayed(ok[0], ", ".join(r.upstream.peer or r.upstream.url for r in ok))
    asked = [r.upstream.peer or r.upstream.url for r in results]
    if results and len(answered) == len(results) and all(r.code == 404 for r in results):
        first = answered[0]
        body = with_note(first.body, not_found_note(asked))
        return _relayed(Sent(first.upstream, 404, first.content_type, body), ", ".join(asked))
    other = [r for r in answered if r.code != 404]
    if other:
        return _relayed(other[0], other[0].upstream.peer or "")
    reasons = "; ".join(f"{r.upstream.url}: {r.error or f'HTTP {r.code}'}" for r in results)
    body = json.dumps({"error": f"ollana: no server could answer: {reasons}"}).encode("utf-8")
    headers = [(b"content-type", JSON_TYPE), (b"x-ollana-error", b"unreachable")]
    return LocalAnswer(502, headers, body + b"\n")


def _relayed(sent: Sent, peers: str) -> LocalAnswer:
    headers = [(b"x-ollana-peer", peers.encode("utf-8"))]
    if sent.content_type is not None:
        headers.insert(0, (b"content-type", sent.content_type))
    return LocalAnswer(sent.code or 502, headers, sent.body)


@implementer(IBodyProducer)
class WholeBody:
    """A body that is all here (a request's, read before it was sent on)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Tail(Protocol):
    """Reads a response body, keeping its last `limit` bytes; one silent for `idle`
    seconds, or cancelled, is dropped."""

    def __init__(self, limit: int, clock: IReactorTime, idle: float) -> None:
        self.limit = limit
        self.data = b""
        self._clock = clock
        self._idle = idle
        self._due: IDelayedCall | None = None
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        self._due = self._clock.callLater(self._idle, self._silent)

    def dataReceived(self, data: bytes) -> None:
        self.data = (self.data + data)[-self.limit :]
        if self._due is not None and self._due.active():
            self._due.reset(self._idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._due is not None and self._due.active():
            self._due.cancel()
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)

    def _silent(self) -> None:
        self._due = None
        self.done.errback(SilentUpstream(f"sent nothing for {self._idle:g} s"))
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            producer: IPushProducer = self.transport  # type: ignore[assignment]
            producer.stopProducing()


class SilentUpstream(Exception):
    """An upstream stopped sending an answer midway."""


def read_tail(
    response: IResponse, clock: IReactorTime, idle: float, limit: int = ANSWER_TAIL
) -> defer.Deferred[bytes]:
    """The last limit bytes of a response's body, once it has all come (or a failure once
    it has been silent for idle seconds)."""
    reader = _Tail(limit, clock, idle)
    response.deliverBody(reader)
    return reader.done


@dataclass(frozen=True)
class Copies:
    """Sends copies of a request (with its whole body) to upstreams: the answer's head may
    take first_byte seconds, and its body may be silent idle seconds at a time."""

    agent: IAgent
    clock: IReactorTime
    first_byte: float
    idle: float

    def send(
        self, upstream: Upstream, method: bytes, path: bytes, headers: Headers, body: bytes
    ) -> defer.Deferred[Sent]:
        """What upstream answered, or why it did not. Never fails; cancelling it drops the
        request."""
        asking = self.agent.request(method, upstream.url.encode("ascii") + path, headers,
                                    WholeBody(body))  # fmt: skip
        asking.addTimeout(self.first_byte, self.clock)
        waited = self.first_byte

        def answered(response: IResponse) -> defer.Deferred[Sent]:
            types = response.headers.getRawHeaders(b"content-type")
            reading = read_tail(response, self.clock, self.idle)
            return reading.addCallback(
                lambda tail: Sent(upstream, response.code, types[-1] if types else None, tail)
            )

        def failed(failure: Failure) -> Sent:
            if failure.check(defer.TimeoutError):
                return Sent(upstream, error=f"no answer within {waited:g} s")
            return Sent(upstream, error=describe_error(failure.value))

        return asking.addCallback(answered).addErrback(failed)
