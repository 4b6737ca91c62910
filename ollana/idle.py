"""The idle timeout of one proxied request: how long its upstream has owed the next move,
and the one timer that ends the wait when that is too long.

The exchange says when the upstream is to move next (``owes(True)``: a chunk of the answer
came, or the request was sent) and when it is not (``owes(False)``: the client is the one
holding things up). A chunk only notes the time; the timer, when it fires, looks at how long
the upstream has really owed, against the limit that holds at that moment (the first-byte
timeout while a model may be loading, else the idle timeout): a timer per chunk cost too
much.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class IdleTimer:
    """Calls ``expired`` once the upstream has owed the next move for longer than
    ``limit()`` allows; ``first`` is the shortest limit there is (when to look first)."""

    def __init__(
        self,
        clock: IReactorTime,
        first: float,
        limit: Callable[[], float],
        expired: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._first = first
        self._limit = limit
        self._expired = expired
        self._call: IDelayedCall | None = None
        self.since: float | None = None  # since when the upstream owes what it owes now
        self.stopped = False

    def owes(self, owes: bool) -> None:
        """The upstream is to move next (counted afresh from now), or it is not."""
        if owes and not self.stopped:
            self.since = self._clock.seconds()
            if self._call is None:
                self._call = self._clock.callLater(self._first, self._check)
        else:
            self.since = None

    def stop(self) -> None:
        """The request has ended: nothing more is owed, and the timer goes, with what it
        would have called (often the methods of the timer's owner: a cycle otherwise)."""
        self.stopped = True
        self.since = None
        self._limit, self._expired = _never, _nothing
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        self._call = None
        if self.since is None:  # owed nothing now: counted afresh when it is
            return
        left = self.since + self._limit() - self._clock.seconds()
        if left > 0:
            self._call = self._clock.callLater(left, self._check)
        else:
            self._expired()


def _never() -> float:
    """A stopped timer's limit."""
    return math.inf


def _nothing() -> None:
    """What a stopped timer would call when expired: nothing."""
