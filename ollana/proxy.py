"""The HTTP side of Ollana. Until the streaming proxy lands, it answers 503."""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import Request, Site


def error_body(message: str) -> bytes:
    """An error in Ollama's own shape, which Ollama clients print."""
    return json.dumps({"error": message}).encode("utf-8") + b"\n"


class NotProxyingYet(Resource):
    """Answers every request with 503 and a JSON error, for the listener's placeholder."""

    isLeaf = True

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def render(self, request: Request) -> bytes:
        request.setResponseCode(503)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return error_body(f"ollana ({self.mode} mode) does not proxy requests yet")


def make_site(mode: str) -> Site:
    site = Site(NotProxyingYet(mode))
    site.displayTracebacks = False
    return site
