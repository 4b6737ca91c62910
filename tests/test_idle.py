"""The idle timeout of one proxied request, on a Clock alone."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ollana.idle import IdleTimer

IDLE, FIRST_BYTE = 10.0, 30.0


class IdleTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limit = IDLE
        self.expired: list[float] = []
        self.timer = IdleTimer(
            self.clock, min(IDLE, FIRST_BYTE), lambda: self.limit, self.note_expired
        )

    def note_expired(self) -> None:
        self.expired.append(self.clock.seconds())

    def test_expires_once_the_upstream_has_owed_for_the_limit(self) -> None:
        self.timer.owes(True)
        self.clock.advance(IDLE - 0.1)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [IDLE])
        self.assertEqual(self.clock.getDelayedCalls(), [], "once")

    def test_each_move_of_the_upstream_counts_afresh_on_one_timer(self) -> None:
        self.timer.owes(True)
        for _ in range(4):
            self.clock.advance(IDLE / 2)
            self.timer.owes(True)  # a chunk came
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.expired, [])
        self.clock.advance(IDLE)
        self.assertEqual(self.expired, [3 * IDLE])

    def test_nothing_expires_while_the_upstream_owes_nothing(self) -> None:
        self.timer.owes(True)
        self.clock.advance(1)
        self.timer.owes(False)  # the client holds things up
        self.clock.advance(10 * IDLE)
        self.assertEqual((self.expired, self.clock.getDelayedCalls()), ([], []))
        self.timer.owes(True)
        self.clock.advance(IDLE)
        self.assertEqual(self.expired, [11 * IDLE + 1])

    def test_the_limit_is_the_one_that_holds_when_the_timer_looks(self) -> None:
        self.limit = FIRST_BYTE  # the request sent: a model may be loading
        self.timer.owes(True)
        self.clock.advance(FIRST_BYTE - 1)
        self.assertEqual(self.expired, [])
        self.limit = IDLE  # the answer began: chunks are due
        self.timer.owes(True)
        self.clock.advance(IDLE)
        self.assertEqual(self.expired, [FIRST_BYTE - 1 + IDLE])

    def test_the_timer_is_consulted_at_the_shortest_limit_first(self) -> None:
        self.limit = FIRST_BYTE
        self.timer.owes(True)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), IDLE)
        self.assertEqual(self.timer.since, 0.0)

    def test_stop_drops_the_timer_for_good(self) -> None:
        self.timer.owes(True)
        self.timer.stop()
        self.assertEqual((self.clock.getDelayedCalls(), self.timer.since), ([], None))
        self.timer.owes(True)
        self.clock.advance(10 * FIRST_BYTE)
        self.assertEqual((self.expired, self.clock.getDelayedCalls()), ([], []))
        self.timer.stop()  # twice is harmless
