"""A fake Ollama for tests and for manual tries: a twisted.web resource tree.

``FakeOllama`` answers the parts of Ollama's API that Ollana looks at::

    fake = FakeOllama(version="0.12.0", models=["llama3.2:latest"])
    site = Site(fake.resource())

Set ``fake.up = False`` to make it answer 500 everywhere, as an Ollama that is
starting or broken does. ``fake.requests`` lists the (method, path) seen.

Run it standalone on loopback with ``python -m tests.fake_ollama --port 11434``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class FakeOllama:
    def __init__(self, version: str = "0.12.0", models: list[str] | None = None) -> None:
        self.version = version
        self.models = list(models or [])
        self.up = True
        self.requests: list[tuple[str, str]] = []

    def resource(self) -> Resource:
        return _Root(self)

    def site(self) -> Site:
        return Site(self.resource())


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        self.fake.requests.append((request.method.decode("ascii"), path))
        if not self.fake.up:
            return self._json(request, 500, {"error": "fake ollama is down"})
        if path == "/":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Ollama is running"
        if path == "/api/version":
            return self._json(request, 200, {"version": self.fake.version})
        if path == "/api/tags":
            models = [{"name": m, "model": m} for m in self.fake.models]
            return self._json(request, 200, {"models": models})
        return self._json(request, 404, {"error": "not found"})

    @staticmethod
    def _json(request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps(body).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a fake Ollama on loopback.")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--version", default="0.12.0")
    parser.add_argument("--model", action="append", default=[])
    args = parser.parse_args()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    fake = FakeOllama(args.version, args.model)
    port = reactor.listenTCP(args.port, fake.site(), interface="127.0.0.1")
    print(f"fake Ollama on http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
