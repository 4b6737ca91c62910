"""What Ollana counts, for /ollana/metrics (Prometheus) and the access log.

Each Metrics has a registry of its own, so one process can hold several (tests do).
Counts that other parts already keep (the pool's servers, the discovery protocols'
datagrams, server mode's load report) are read when scraped rather than copied.
prometheus_client is imported at the first scrape, not with this module: a node nobody
scrapes never loads it (1.2 MB of its resident memory).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from ollana.interfaces import IServerState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily, Metric

# Seconds: from a few milliseconds (a listing) to many minutes (a long generation).
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

LOCAL = "local"  # the peer label of answers made here (listings, errors before any server)
UNNAMED = "unknown"  # the model label of requests that named no model (in time)


class Metrics:
    """The proxy's request metrics, plus collectors that read peers and discovery.

    Requests are counted in plain numbers, turned into Prometheus metrics at each scrape:
    every request changes seven of them, and prometheus-client's own metrics take a lock
    for each change, which cost the proxy a few percent of its time. The reactor's thread
    is the only one that counts or scrapes.
    """

    def __init__(self) -> None:
        self._collectors: list[_Computed] = []
        self._registry: CollectorRegistry | None = None
        self.in_flight = 0
        self.requests: dict[tuple[str, int], int] = {}  # (peer, status) -> answered
        self.first_byte = Buckets(TTFB_BUCKETS)
        self.duration = Buckets(DURATION_BUCKETS)
        self.bytes_in = 0
        self.bytes_out = 0
        self.routes: dict[str, int] = {}  # why the server was chosen -> answered
        self.cached_tokens = 0
        self.evaluated_tokens = 0
        self.watch(self._requests)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry scrapes read: made (and prometheus_client imported) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=True)
            for collector in self._collectors:
                self._registry.register(collector)
        return self._registry

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at each scrape (from the pool, the discovery protocols)."""
        collector = _Computed(collect)
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    def started(self) -> None:
        """A request is under way."""
        self.in_flight += 1

    def ended(
        self, peer: str | None, status: int, first_byte: float | None, duration: float,
        bytes_in: int, bytes_out: int,
    ) -> None:  # fmt: skip
        """Count one finished request."""
        self.in_flight -= 1
        key = (peer or LOCAL, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if first_byte is not None:
            self.first_byte.observe(first_byte)
        self.duration.observe(duration)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def routed(self, reason: str) -> None:
        """Count an answered request by why its server was chosen (X-Ollana-Route)."""
        self.routes[reason] = self.routes.get(reason, 0) + 1

    def prompt_tokens(self, cached: int, evaluated: int) -> None:
        """Count an answer's prompt tokens: those a server's prompt cache held, and those it
        evaluated (from the final chunk's counts)."""
        self.cached_tokens += max(0, cached)
        self.evaluated_tokens += max(0, evaluated)

    def _requests(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "ollana_requests_in_flight", "Requests under way.", value=self.in_flight
        )
        requests = CounterMetricFamily(
            "ollana_requests", "Requests answered, by server and status.", labels=["peer", "status"]
        )
        for (peer, status), count in self.requests.items():
            requests.add_metric([peer, str(status)], count)
        yield requests
        yield self.first_byte.family(
            "ollana_time_to_first_byte_seconds", "From the request to the response's status."
        )
        yield self.duration.family(
            "ollana_request_duration_seconds", "From the request to the response's end."
        )
        yield CounterMetricFamily(
            "ollana_request_body_bytes", "Request body bytes read from clients.",
            value=self.bytes_in,
        )  # fmt: skip
        yield CounterMetricFamily(
            "ollana_response_body_bytes", "Response body bytes written to clients.",
            value=self.bytes_out,
        )  # fmt: skip
        routes = CounterMetricFamily(
            "ollana_route", "Requests answered, by why their server was chosen.", labels=["reason"]
        )
        for reason, count in self.routes.items():
            routes.add_metric([reason], count)
        yield routes
        tokens = CounterMetricFamily(
            "ollana_prompt_tokens", "Prompt tokens of answers: from a prompt cache, evaluated.",
            labels=["kind"],
        )  # fmt: skip
        tokens.add_metric(["cached"], self.cached_tokens)
        tokens.add_metric(["evaluated"], self.evaluated_tokens)
        yield tokens


class Buckets:
    """A histogram's counts (each bucket's own, not yet cumulative) and sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        cumulative, buckets = 0, []
        for bound, count in zip(
            [*map(floatToGoString, self.bounds), "+Inf"], self.counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class _Computed:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> list[Metric]:
        return []  # computed afresh at each scrape


class Server(Protocol):
    """What the metrics count of a server (an ollana.peers.Peer)."""

    @property
    def usable(self) -> bool: ...
    @property
    def healthy(self) -> bool: ...


class DatagramCounts(Protocol):
    """What the metrics count of a discovery protocol (ollana.discovery's)."""

    @property
    def sent(self) -> int: ...
    @property
    def received(self) -> int: ...
    @property
    def rejected(self) -> int: ...


def peer_metrics(peers: Iterable[Server]) -> Iterator[Metric]:
    """Servers by health, for a pool's peers."""
    from prometheus_client.core import GaugeMetricFamily

    states = GaugeMetricFamily("ollana_peers", "Known servers, by health.", labels=["state"])
    usable = [peer for peer in peers if peer.usable]
    healthy = sum(1 for peer in usable if peer.healthy)
    states.add_metric(["healthy"], healthy)
    states.add_metric(["unhealthy"], len(usable) - healthy)
    yield states


def discovery_metrics(protocols: Iterable[DatagramCounts]) -> Iterator[Metric]:
    """Discovery datagrams sent, received and rejected, summed over the given protocols."""
    from prometheus_client.core import CounterMetricFamily

    packets = CounterMetricFamily(
        "ollana_discovery_packets", "Discovery datagrams.", labels=["direction"]
    )
    protocols = list(protocols)
    for direction in ("sent", "received", "rejected"):
        packets.add_metric([direction], sum(getattr(p, direction) for p in protocols))
    yield packets


def load_metrics(state: IServerState | None) -> Iterator[Metric]:
    """Server mode: the requests being relayed to the Ollama per model (in flight, and of
    those waiting for the first byte), and the models it has loaded; nothing without a
    report (client mode)."""
    if state is None:
        return
    from prometheus_client.core import GaugeMetricFamily

    requests = GaugeMetricFamily(
        "ollana_ollama_requests", "Requests being relayed to the Ollama, by model: in flight, "
        "and of those waiting for the first byte.", labels=["model", "state"],
    )  # fmt: skip
    for model in sorted(set(state.loaded) | set(state.models)):
        requests.add_metric([model or UNNAMED, "in_flight"], state.in_flight(model))
        requests.add_metric([model or UNNAMED, "waiting"], state.waiting(model))
    yield requests
    yield GaugeMetricFamily(
        "ollana_ollama_loaded_models", "Models the Ollama has loaded (its /api/ps).",
        value=len(state.loaded),
    )  # fmt: skip
