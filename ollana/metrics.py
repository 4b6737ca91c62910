"""What Ollana counts, for /ollana/metrics (Prometheus) and the access log.

Each Metrics has a registry of its own, so one process can hold several (tests do).
Counts that other parts already keep (the pool's servers, the discovery protocols'
datagrams) are read when scraped rather than copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Seconds: from a few milliseconds (a listing) to many minutes (a long generation).
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

LOCAL = "local"  # the peer label of answers made here (listings, errors before any server)


class Metrics:
    """The proxy's request metrics, plus collectors that read peers and discovery."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ollana_requests", "Requests answered, by server and status.", ["peer", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("ollana_requests_in_flight", "Requests under way.", registry=r)
        self.first_byte = Histogram(
            "ollana_time_to_first_byte_seconds", "From the request to the response's status.",
            buckets=TTFB_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "ollana_request_duration_seconds", "From the request to the response's end.",
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes_in = Counter(
            "ollana_request_body_bytes", "Request body bytes read from clients.", registry=r
        )
        self.bytes_out = Counter(
            "ollana_response_body_bytes", "Response body bytes written to clients.", registry=r
        )
        self._requests_by: dict[tuple[str, int], Any] = {}  # the counter of each label pair

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at each scrape (from the pool, the discovery protocols)."""
        self.registry.register(_Computed(collect))

    def ended(
        self, peer: str | None, status: int, first_byte: float | None, duration: float,
        bytes_in: int, bytes_out: int,
    ) -> None:  # fmt: skip
        """Count one finished request."""
        key = (peer or LOCAL, status)
        counter = self._requests_by.get(key)
        if counter is None:  # labels() is slow: look each (peer, status) up once
            if len(self._requests_by) > 4096:  # peers come and go
                self._requests_by.clear()
            counter = self._requests_by[key] = self.requests.labels(key[0], str(status))
        counter.inc()
        if first_byte is not None:
            self.first_byte.observe(first_byte)
        self.duration.observe(duration)
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)


class _Computed:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> list[Any]:
        return []  # computed afresh at each scrape


def peer_metrics(peers: Iterable[Any]) -> Iterator[Metric]:
    """Servers by health, for a pool's peers."""
    states = GaugeMetricFamily("ollana_peers", "Known servers, by health.", labels=["state"])
    usable = [peer for peer in peers if peer.usable]
    healthy = sum(1 for peer in usable if peer.healthy)
    states.add_metric(["healthy"], healthy)
    states.add_metric(["unhealthy"], len(usable) - healthy)
    yield states


def discovery_metrics(protocols: Iterable[Any]) -> Iterator[Metric]:
    """Discovery datagrams sent, received and rejected, summed over the given protocols."""
    packets = CounterMetricFamily(
        "ollana_discovery_packets", "Discovery datagrams.", labels=["direction"]
    )
    protocols = list(protocols)
    for direction in ("sent", "received", "rejected"):
        packets.add_metric([direction], sum(getattr(p, direction) for p in protocols))
    yield packets
