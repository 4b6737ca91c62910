"""Log output for people and for machines.

``json_observer`` writes one JSON object per event and line, for log shippers: time,
level, namespace, the message as text, and the event's own fields (method, status, peer,
duration_ms... for access lines). Use it with ``twistd --logger ollana.logs.json_observer``
or ``ollana serve --log-format json``; ``text_observer`` writes twistd's usual lines. Both
write to $OLLANA_LOGFILE if set (rotated, with a few old files kept), and leave out debug
events unless $OLLANA_LOG_LEVEL asks for them. ``Summary`` keeps a line that a flood could
repeat (a refused connection, a bad request) to one line per interval with a count.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

# Keys of Twisted's own bookkeeping (new and legacy events), left out of the fields.
# "summary" is an access line's text, which is already the message.
_INTERNAL = frozenset(
    {"message", "isError", "system", "time", "format", "why", "failure", "summary"}
)


@implementer(ILogObserver)
class JSONLines:
    """An observer writing each event as one line of JSON to a text stream."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in _INTERNAL and key not in record:
                record[key] = value if _plain(value) else repr(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


LOGFILE_ENV = "OLLANA_LOGFILE"
LOG_LEVEL_ENV = "OLLANA_LOG_LEVEL"
ROTATE_BYTES = 1_000_000  # as twistd's --logfile
ROTATED_FILES = 5  # kept besides the current one: at most 6 MB of log
LEVELS = ("debug", "info", "warn", "error", "critical")


def json_observer() -> ILogObserver:
    """JSON lines: see log_observer."""
    return log_observer(JSONLines, os.environ)


def text_observer() -> ILogObserver:
    """twistd's own text lines: see log_observer."""
    return log_observer(textFileLogObserver, os.environ)


def log_observer(
    make: Callable[[IO[str]], ILogObserver], environ: Mapping[str, str]
) -> ILogObserver:
    """An observer for twistd's --logger (whose factories take no arguments, hence the
    environment): writing to standard output, or to the file $OLLANA_LOGFILE names,
    rotated at 1 MB with ROTATED_FILES old ones kept; only events at $OLLANA_LOG_LEVEL
    (info by default) and above, so that debug lines, some of them one per datagram,
    are written only when asked for."""
    path = environ.get(LOGFILE_ENV)
    out = sys.stdout if not path else rotated_file(path)
    name = environ.get(LOG_LEVEL_ENV, "").strip().lower() or "info"
    level = LogLevel.levelWithName(name) if name in LEVELS else LogLevel.info
    observer = FilteringLogObserver(make(out), [LogLevelFilterPredicate(level)])
    if name not in LEVELS:
        Logger(namespace=__name__, observer=observer).warn(
            "${variable} must be one of {levels}, not {name!r}: logging at info",
            variable=LOG_LEVEL_ENV, levels=", ".join(LEVELS), name=name,
        )  # fmt: skip
    return observer


def rotated_file(path: str) -> IO[str]:
    """The log file at path (appended to), rotated at ROTATE_BYTES with ROTATED_FILES old
    ones kept as path.1 (the newest) to path.5."""
    log_file = LogFile.fromFullPath(path, rotateLength=ROTATE_BYTES, maxRotatedFiles=ROTATED_FILES)
    return cast(IO[str], log_file)  # it takes str, as the observers write it


class Summary:
    """One kind of log line that a flood could repeat: the first is logged at once; repeats
    are counted and logged as one line (the last one's fields, with the count) at the end of
    each interval in which there were any, so a flood writes a line per interval."""

    def __init__(
        self,
        logger: Logger,
        clock: IReactorTime,
        interval: float = 60.0,
        level: LogLevel = LogLevel.warn,
    ) -> None:
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self.level = level
        self._due: IDelayedCall | None = None  # set while an interval runs
        self._repeats = 0
        self._last: tuple[str, dict[str, Any]] = ("", {})

    def __call__(self, format: str, **fields: Any) -> None:
        """Log this line now, or count it if a line of this kind was logged recently."""
        if self._due is None:
            self.logger.emit(self.level, format, **fields)
            self._due = self.clock.callLater(self.interval, self._interval_ended)
        else:
            self._repeats += 1
            self._last = (format, fields)

    def _interval_ended(self) -> None:
        self._due = None
        if self._repeats:
            self.flush()
            self._due = self.clock.callLater(self.interval, self._interval_ended)

    def flush(self) -> None:
        """Log the repeats counted so far as one line, if there were any."""
        repeats, self._repeats = self._repeats, 0
        if repeats:
            format, fields = self._last
            fields = {**fields, "repeated": repeats, "interval": self.interval}
            self.logger.emit(self.level, format + " ({repeated} more in {interval:g} s)", **fields)

    def stop(self) -> None:
        """Log what is counted and stop the timer (the listener is stopping)."""
        self.flush()
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()
