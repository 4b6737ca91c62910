"""The request metrics as Prometheus reads them: counted in plain numbers, exposed at
each scrape."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from ollana.metrics import Metrics


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
