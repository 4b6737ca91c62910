"""Ollana's own pages, under /ollana/ on the proxy's listener: the status as JSON
(api/status) and the Prometheus metrics (metrics)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from ollana.peers import Peer


def peer_status(peer: Peer, now: float) -> dict[str, Any]:
    """One server as the status shows it."""
    return {
        "id": peer.key,
        "address": peer.host,
        "port": peer.port,
        "scheme": peer.scheme,
        "source": peer.source.value,
        "healthy": peer.healthy,
        "reason": peer.reason,
        "latency_ms": None if peer.latency is None else round(peer.latency * 1000, 1),
        "active_requests": peer.active,
        "total_requests": peer.total_requests,
        "failures": peer.failures,
        "models": sorted(peer.models),
        "last_seen": datetime.fromtimestamp(peer.last_seen, timezone.utc).isoformat(),
        "last_seen_s_ago": round(max(0.0, now - peer.last_seen), 1),
    }


class StatusPages(Resource):
    """/ollana/: api/status and metrics for one node (anything with status() and observed)."""

    def __init__(self, node: Any) -> None:
        super().__init__()
        api = Resource()
        api.putChild(b"status", StatusJSON(node))
        self.putChild(b"api", api)
        self.putChild(b"metrics", MetricsPage(node))


class StatusJSON(Resource):
    isLeaf = True

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.node.status(), indent=2).encode("utf-8") + b"\n"


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.node.observed.metrics.registry)
