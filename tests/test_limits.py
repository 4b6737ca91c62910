"""Open files: the soft limit raised at start, and the connection cap sized from it."""

from __future__ import annotations

import errno

from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ollana.gate import Gate
from ollana.limits import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    UNLIMITED_TARGET,
    connection_cap,
    open_files_cap,
    raise_open_files,
    soft_limit_target,
)
from tests.support.fakes import capture_logs

INFINITY = -1  # as resource.RLIM_INFINITY on Linux


class FakeResource:
    """The resource module's open-file limits, in memory; setrlimit can be made to fail."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = INFINITY

    def __init__(self, soft: int, hard: int, error: Exception | None = None) -> None:
        self.limits = (soft, hard)
        self.error = error
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, resource: int, /) -> tuple[int, int]:
        assert resource == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, resource: int, limits: tuple[int, int], /) -> None:
        assert resource == self.RLIMIT_NOFILE
        self.set.append(limits)
        if self.error is not None:
            raise self.error
        self.limits = limits


class ComputationTests(SynchronousTestCase):
    def test_the_soft_limit_goes_up_to_the_hard_one(self) -> None:
        self.assertEqual(soft_limit_target(1024, 524288, INFINITY), 524288)
        self.assertEqual(soft_limit_target(65536, 65536, INFINITY), 65536)
        self.assertEqual(soft_limit_target(1024, INFINITY, INFINITY), UNLIMITED_TARGET)
        self.assertEqual(soft_limit_target(100_000, INFINITY, INFINITY), 100_000, "never down")
        self.assertEqual(soft_limit_target(INFINITY, INFINITY, INFINITY), INFINITY)

    def test_two_descriptors_a_connection_after_a_reserve(self) -> None:
        self.assertEqual(connection_cap(1024), (1024 - FD_RESERVE) // 2)
        self.assertEqual(connection_cap(1024), 480)
        self.assertEqual(connection_cap(2 * MAX_CONNECTIONS + FD_RESERVE), MAX_CONNECTIONS)
        self.assertEqual(connection_cap(2 * MAX_CONNECTIONS + FD_RESERVE - 1), MAX_CONNECTIONS - 1)
        self.assertEqual(connection_cap(1_048_576), MAX_CONNECTIONS)
        self.assertEqual(connection_cap(None), MAX_CONNECTIONS)
        self.assertEqual(connection_cap(10), 1, "never none at all")
        self.assertEqual(connection_cap(1024, most=100), 100)

    def test_the_cap_of_the_limit_in_force(self) -> None:
        self.assertEqual(open_files_cap(FakeResource(1024, 4096)), 480)
        self.assertEqual(open_files_cap(FakeResource(INFINITY, INFINITY)), MAX_CONNECTIONS)
        self.assertEqual(open_files_cap(None), MAX_CONNECTIONS)

    def test_a_gate_is_capped_by_the_open_files_of_this_process(self) -> None:
        self.assertEqual(Gate().max_connections, open_files_cap())
        self.assertEqual(Gate(max_connections=None).max_connections, None)


class RaiseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = capture_logs(self)

    def lines(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == level]

    def test_raised_to_the_hard_limit_and_said_once(self) -> None:
        resource = FakeResource(1024, 524288)
        self.assertEqual(raise_open_files(resource), 524288)
        self.assertEqual(resource.set, [(524288, 524288)])
        self.assertEqual(
            self.lines(LogLevel.info),
            ["Open files: limit raised from 1024 to 524288 (hard limit: 524288)"],
        )
        self.assertEqual(self.lines(LogLevel.warn), [])

    def test_already_there(self) -> None:
        resource = FakeResource(65536, 65536)
        self.assertEqual(raise_open_files(resource), 65536)
        self.assertEqual(resource.set, [])
        self.assertEqual(self.lines(LogLevel.info), ["Open files: 65536 allowed"])

    def test_an_unlimited_hard_limit(self) -> None:
        resource = FakeResource(256, INFINITY)
        self.assertEqual(raise_open_files(resource), UNLIMITED_TARGET)
        self.assertEqual(resource.set, [(UNLIMITED_TARGET, INFINITY)], "the hard one kept")
        self.assertEqual(
            self.lines(LogLevel.info),
            ["Open files: limit raised from 256 to 65536 (hard limit: unlimited)"],
        )

    def test_a_low_hard_limit_lowers_the_cap_and_says_so(self) -> None:
        self.assertEqual(raise_open_files(FakeResource(256, 1024)), 1024)
        [warning] = self.lines(LogLevel.warn)
        self.assertEqual(
            warning,
            "At most 480 connections in all, not 4096: 1024 open files allowed, two for each "
            "proxied request (raise the hard limit: LimitNOFILE=, ulimit -Hn)",
        )

    def test_a_refusal_is_logged_not_raised(self) -> None:
        resource = FakeResource(1024, 524288, OSError(errno.EPERM, "Operation not permitted"))
        self.assertEqual(raise_open_files(resource), 1024)
        self.assertEqual(
            self.lines(LogLevel.warn),
            [
                "Open files: cannot raise the limit from 1024 to 524288: Operation not permitted",
                "At most 480 connections in all, not 4096: 1024 open files allowed, two for "
                "each proxied request (raise the hard limit: LimitNOFILE=, ulimit -Hn)",
            ],
        )
        resource = FakeResource(1024, 524288, ValueError("not allowed to raise maximum limit"))
        self.assertEqual(raise_open_files(resource), 1024)
        self.assertIn("not allowed to raise maximum limit", self.lines(LogLevel.warn)[-2])

    def test_no_rlimits_here(self) -> None:
        self.assertIsNone(raise_open_files(None))
        self.assertEqual(len(self.events), 0)
