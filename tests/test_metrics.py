"""The request metrics as Prometheus reads them: counted in plain numbers, exposed at
each scrape; and server mode's load report as gauges."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from ollana.metrics import Metrics, load_metrics
from ollana.state import ServerState


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class RequestMetricsTests(SynchronousTestCase):
    def test_counts_by_peer_and_status(self) -> None:
        metrics = Metrics()
        for peer, status in [("a:1", 200), ("a:1", 200), (None, 503), ("b:2", 404)]:
            metrics.started()
            metrics.ended(peer, status, 0.01, 0.02, 10, 20)
        metrics.started()  # one still under way
        samples = scrape(metrics)

        def requests(peer: str, status: str) -> float:
            return samples[
                ("ollana_requests_total", frozenset({("peer", peer), ("status", status)}))
            ]

        self.assertEqual(requests("a:1", "200"), 2)
        self.assertEqual(requests("local", "503"), 1)
        self.assertEqual(requests("b:2", "404"), 1)
        self.assertEqual(samples[("ollana_requests_in_flight", frozenset())], 1)
        self.assertEqual(samples[("ollana_request_body_bytes_total", frozenset())], 40)
        self.assertEqual(samples[("ollana_response_body_bytes_total", frozenset())], 80)

    def test_histogram_buckets_are_cumulative_and_inclusive(self) -> None:
        metrics = Metrics()
        for duration in (0.01, 0.01, 0.3, 5000.0):  # 0.01 is a bound: counted in it
            metrics.started()
            metrics.ended("a:1", 200, None, duration, 0, 0)
        samples = scrape(metrics)

        def bucket(le: str) -> float:
            return samples[("ollana_request_duration_seconds_bucket", frozenset({("le", le)}))]

        self.assertEqual(bucket("0.01"), 2)
        self.assertEqual(bucket("0.1"), 2)
        self.assertEqual(bucket("0.5"), 3)
        self.assertEqual(bucket("1800.0"), 3)
        self.assertEqual(bucket("+Inf"), 4)
        self.assertEqual(samples[("ollana_request_duration_seconds_count", frozenset())], 4)
        self.assertAlmostEqual(
            samples[("ollana_request_duration_seconds_sum", frozenset())], 5000.32
        )
        # No first byte was recorded (answers that never started): an empty histogram.
        self.assertEqual(samples[("ollana_time_to_first_byte_seconds_count", frozenset())], 0)


class RoutingMetricsTests(SynchronousTestCase):
    def test_routes_counted_by_reason(self) -> None:
        metrics = Metrics()
        self.assertEqual([key for key in scrape(metrics) if key[0] == "ollana_route_total"], [])
        for reason in ("warm", "affinity", "warm", "cold"):
            metrics.routed(reason)
        samples = scrape(metrics)
        self.assertEqual(
            {dict(labels)["reason"]: value for (name, labels), value in samples.items()
             if name == "ollana_route_total"},
            {"warm": 2, "affinity": 1, "cold": 1},
        )  # fmt: skip

    def test_prompt_tokens_cached_and_evaluated(self) -> None:
        metrics = Metrics()

        def tokens(kind: str) -> float:
            return scrape(metrics)[("ollana_prompt_tokens_total", frozenset({("kind", kind)}))]

        self.assertEqual((tokens("cached"), tokens("evaluated")), (0, 0))
        metrics.prompt_tokens(cached=690, evaluated=10)
        metrics.prompt_tokens(cached=0, evaluated=700)
        metrics.prompt_tokens(cached=-5, evaluated=-1)  # nonsense: a counter never falls
        self.assertEqual((tokens("cached"), tokens("evaluated")), (690, 710))


class LoadMetricsTests(SynchronousTestCase):
    def test_requests_per_model_and_loaded_models(self) -> None:
        state = ServerState(
            parallel=2,
            loaded=frozenset({"llama3.2:latest", "qwen3:8b"}),
            models={"llama3.2:latest": (3, 1), "phi4:latest": (1, 1), "": (2, 0)},
        )
        metrics = Metrics()
        metrics.watch(lambda: load_metrics(state))
        samples = scrape(metrics)

        def requests(model: str, kind: str) -> float:
            return samples[
                ("ollana_ollama_requests", frozenset({("model", model), ("state", kind)}))
            ]

        self.assertEqual((requests("llama3.2:latest", "in_flight"),
                          requests("llama3.2:latest", "waiting")), (3, 1))  # fmt: skip
        self.assertEqual((requests("qwen3:8b", "in_flight"), requests("qwen3:8b", "waiting")),
                         (0, 0))  # fmt: skip
        self.assertEqual(requests("phi4:latest", "in_flight"), 1)  # being loaded
        self.assertEqual(requests("unknown", "in_flight"), 2)  # named no model
        self.assertEqual(samples[("ollana_ollama_loaded_models", frozenset())], 2)

    def test_nothing_without_a_report(self) -> None:
        metrics = Metrics()
        metrics.watch(lambda: load_metrics(None))
        names = {name for name, _ in scrape(metrics)}
        self.assertEqual({name for name in names if name.startswith("ollana_ollama_")}, set())
