"""A simulated Ollama for the demo and for tests: a twisted.web resource tree.

``FakeOllama`` (also known as ``SimulatedOllama``) answers the parts of Ollama's API
that Ollana and Ollama clients use, in Ollama's JSON shapes, without any model: every
model "answers" by echoing the prompt back word by word. ``ollana demo`` runs one with
the single model ``echo`` (``ECHO_MODEL``)::

    fake = FakeOllama(version="0.12.0", models=["llama3.2:latest"], clock=reactor)
    site = fake.site()

- ``GET /``, ``/api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/show``.
- ``POST /api/generate`` and ``/api/chat`` stream NDJSON, one line per word of the
  answer (the prompt, or the last message, echoed back), or answer once with
  ``"stream": false``. ``POST /v1/chat/completions`` does the same as SSE.
- ``POST /api/embed`` gives one small vector per input.
- ``POST /api/blobs/sha256:<hex>`` checks the body's digest (201 or 400);
  ``HEAD`` of the same path says whether it was stored (200 or 404).

Pacing: with ``fake.pace = seconds`` the stream waits that long (on the given clock)
before each chunk. With ``fake.gated = True`` it waits for ``fake.release()`` instead,
so a test decides exactly when each chunk leaves. ``fake.emitted`` counts the chunks
written so far and ``fake.abandoned`` the streams whose client went away. Set
``fake.up = False`` to answer 500 everywhere, as an Ollama that is starting or broken
does. ``fake.requests`` lists (method, path) and ``fake.headers`` the request headers.

A model name without a tag means ``:latest``, as in Ollama (``echo`` is ``echo:latest``).
With ``record=False`` the requests and headers are not kept (for a long-running demo).

Run it standalone on loopback with ``python -m ollana.simulator --port 11434`` (the
``echo`` model, 0.05 s between tokens), or ``python -m tests.fake_ollama`` (the tests'
``llama3.2:latest``, no pacing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

CREATED = "2026-11-22T00:00:00Z"
ECHO_MODEL = "echo:latest"
DEFAULT_MODELS = ["llama3.2:latest"]


def full_name(model: str) -> str:
    """A model name as Ollama reads it: no tag means ``:latest``."""
    return model if ":" in model.rpartition("/")[2] else model + ":latest"


class FakeOllama:
    def __init__(
        self,
        version: str = "0.12.0",
        models: list[str] | None = None,
        clock: IReactorTime | None = None,
        record: bool = True,
    ) -> None:
        self.version = version
        self.models = list(models if models is not None else DEFAULT_MODELS)
        self.clock = clock
        self.record = record
        self.up = True
        self.pace = 0.0
        self.gated = False
        self.emitted = 0
        self._gates: list[defer.Deferred[None]] = []
        self._released = 0
        self.blobs: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.headers: list[Headers] = []
        self.open_streams = 0
        self.abandoned = 0

    def has(self, model: str) -> bool:
        """Whether this model is here (``echo`` finds ``echo:latest``)."""
        return full_name(model) in {full_name(m) for m in self.models}

    def resource(self) -> Resource:
        return _Root(self)

    def site(self, access_log: bool = True) -> Site:
        """A Site for the fake, timing out idle connections on its clock, if it has one;
        without access_log, it logs no line per request."""
        site_class = Site if access_log else _QuietSite
        if self.clock is None:
            return site_class(self.resource())
        return site_class(self.resource(), reactor=self.clock)

    def release(self, chunks: int = 1) -> None:
        """With gated streams: let this many more chunks go."""
        for _ in range(chunks):
            if self._gates:
                self._gates.pop(0).callback(None)
            else:
                self._released += 1

    def _before_chunk(self) -> defer.Deferred[None] | None:
        if self.gated:
            if self._released:
                self._released -= 1
                return None
            gate: defer.Deferred[None] = defer.Deferred()
            self._gates.append(gate)
            return gate
        if self.pace and self.clock is not None:
            return task.deferLater(self.clock, self.pace)
        return None


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        pass


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(body).encode("utf-8")


def _content(request: Request) -> Any:
    assert request.content is not None
    return request.content


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": CREATED,
        "size": 1000,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {"format": "gguf", "family": "fake", "parameter_size": "1B"},
    }


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> Any:
        fake = self.fake
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii")
        if fake.record:
            fake.requests.append((method, path))
            fake.headers.append(request.requestHeaders.copy())
        if not fake.up:
            return _json(request, 500, {"error": "fake ollama is down"})
        if path.startswith("/api/blobs/sha256:"):
            return self.blob(request, path.rpartition(":")[2])
        if method in ("GET", "HEAD"):
            return self.get(request, path)
        if method == "OPTIONS":
            request.setHeader(b"Allow", b"GET, HEAD, POST, DELETE, OPTIONS")
            request.setResponseCode(204)
            return b""
        try:
            body = json.loads(_content(request).read() or b"{}")
        except ValueError:
            return _json(request, 400, {"error": "invalid JSON"})
        return self.post(request, path, body)

    def get(self, request: Request, path: str) -> bytes:
        if path == "/":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Ollama is running"
        if path == "/api/version":
            return _json(request, 200, {"version": self.fake.version})
        if path == "/api/tags":
            return _json(request, 200, {"models": [_model_entry(m) for m in self.fake.models]})
        if path == "/api/ps":
            return _json(request, 200, {"models": []})
        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "library"}
                    for m in self.fake.models]  # fmt: skip
            return _json(request, 200, {"object": "list", "data": data})
        return _json(request, 404, {"error": "not found"})

    def blob(self, request: Request, digest: str) -> bytes:
        if request.method == b"HEAD":
            request.setResponseCode(200 if digest in self.fake.blobs else 404)
            return b""
        sha = hashlib.sha256()
        content = _content(request)
        content.seek(0)
        for piece in iter(lambda: content.read(1 << 20), b""):
            sha.update(piece)
        if sha.hexdigest() != digest:
            return _json(request, 400, {"error": "digest mismatch"})
        self.fake.blobs.add(digest)
        request.setResponseCode(201)
        return b""

    def post(self, request: Request, path: str, body: dict[str, Any]) -> Any:
        model = body.get("model") or body.get("name") or ""
        if path == "/api/show":
            if not self.fake.has(model):
                return _json(request, 404, {"error": f"model '{model}' not found"})
            return _json(request, 200, {"modelfile": "", "parameters": "", "template": "",
                                        "details": _model_entry(model)["details"],
                                        "model_info": {}, "capabilities": ["completion"],
                                        "modified_at": CREATED})  # fmt: skip
        if path == "/api/embed":
            inputs = body.get("input", "")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            vectors = [[float(len(str(i))), 0.5, -0.5] for i in inputs]
            return _json(request, 200, {"model": model, "embeddings": vectors})
        if path == "/api/generate":
            words = str(body.get("prompt", "")).split() or ["ok"]
            return self.ndjson(request, body, [self.generate_chunk(model, w) for w in words],
                               {"model": model, "created_at": CREATED, "response": "",
                                "done": True, "done_reason": "stop"})  # fmt: skip
        if path == "/api/chat":
            messages = body.get("messages") or [{"content": "ok"}]
            words = str(messages[-1].get("content", "")).split() or ["ok"]
            final = {"model": model, "created_at": CREATED, "done": True, "done_reason": "stop",
                     "message": {"role": "assistant", "content": ""}}  # fmt: skip
            return self.ndjson(request, body, [self.chat_chunk(model, w) for w in words], final)
        if path == "/v1/chat/completions":
            messages = body.get("messages") or [{"content": "ok"}]
            words = str(messages[-1].get("content", "")).split() or ["ok"]
            return self.sse(request, body, model, words)
        return _json(request, 404, {"error": "not found"})

    @staticmethod
    def generate_chunk(model: str, word: str) -> dict[str, Any]:
        return {"model": model, "created_at": CREATED, "response": word + " ", "done": False}

    @staticmethod
    def chat_chunk(model: str, word: str) -> dict[str, Any]:
        return {"model": model, "created_at": CREATED, "done": False,
                "message": {"role": "assistant", "content": word + " "}}  # fmt: skip

    def ndjson(self, request: Request, body: dict[str, Any], chunks: list[Any], final: Any) -> Any:
        if body.get("stream") is False:
            whole = dict(final)
            if "response" in whole:
                whole["response"] = "".join(c["response"] for c in chunks)
            else:
                text = "".join(c["message"]["content"] for c in chunks)
                whole["message"] = {"role": "assistant", "content": text}
            return _json(request, 200, whole)
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        lines = [json.dumps(c).encode() + b"\n" for c in [*chunks, final]]
        self.stream(request, lines)
        return NOT_DONE_YET

    def sse(self, request: Request, body: dict[str, Any], model: str, words: list[str]) -> Any:
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            return _json(request, 200, {"id": "chatcmpl-1", "object": "chat.completion",
                                        "model": model, "choices": [{"index": 0,
                                        "message": message, "finish_reason": "stop"}]})  # fmt: skip
        request.setHeader(b"Content-Type", b"text/event-stream")
        events = []
        for word in words:
            delta = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": word + " "}}]}  # fmt: skip
            events.append(b"data: " + json.dumps(delta).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        self.stream(request, events)
        return NOT_DONE_YET

    def stream(self, request: Request, pieces: list[bytes]) -> None:
        """Write the pieces one at a time, each after the fake's pacing or gate."""
        fake = self.fake
        fake.open_streams += 1
        gone: list[bool] = []

        def abandoned(_: object) -> None:
            gone.append(True)
            fake.abandoned += 1

        request.notifyFinish().addErrback(abandoned)

        async def run() -> None:
            try:
                for piece in pieces:
                    wait = fake._before_chunk()
                    if wait is not None:
                        await wait
                    if gone:
                        return
                    request.write(piece)
                    fake.emitted += 1
                request.finish()
            finally:
                fake.open_streams -= 1

        defer.Deferred.fromCoroutine(run())


def main(
    argv: list[str] | None = None,
    *,
    label: str = "simulated Ollama",
    models: list[str] | None = None,
    pace: float = 0.05,
) -> None:
    """Serve a simulated Ollama on loopback until interrupted."""
    default_models = models if models is not None else [ECHO_MODEL]
    parser = argparse.ArgumentParser(description=f"Run a {label} on loopback (127.0.0.1).")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--version", default="0.12.0")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"a model to list (repeatable) [default: {', '.join(default_models)}]",
    )
    parser.add_argument(
        "--pace", type=float, default=pace, help=f"seconds between chunks [default: {pace:g}]"
    )
    args = parser.parse_args(argv)
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    fake = FakeOllama(args.version, args.model or default_models, clock=reactor, record=False)
    fake.pace = args.pace
    port = reactor.listenTCP(args.port, fake.site(), interface="127.0.0.1")
    print(f"{label} on http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


SimulatedOllama = FakeOllama

__all__ = [
    "CREATED",
    "DEFAULT_MODELS",
    "ECHO_MODEL",
    "FakeOllama",
    "SimulatedOllama",
    "full_name",
]

if __name__ == "__main__":
    main()
