"""Log output for people and for machines, written at little cost per line.

``text_observer`` writes twistd's usual lines, ``json_observer`` one JSON object per event
and line for log shippers: time, level, namespace, the message as text, and the event's
own fields (method, status, peer, duration_ms... for access lines). Use them with
``twistd --logger ollana.logs.text_observer`` (or ``ollana serve --log-format text|json``).
Both write to $OLLANA_LOGFILE if set (rotated, with a few old files kept), and leave out
debug events unless $OLLANA_LOG_LEVEL asks for them. While the reactor runs, lines are
kept for up to FLUSH_DELAY seconds and written together (at once for errors, and all of
them when the reactor begins to stop); the time is formatted once per second. ``Summary``
keeps a line that a flood could repeat (a refused connection, a bad request) to one line
per interval with a count.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import IO

from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LOGFILE_ENV = "OLLANA_LOGFILE"
LOG_LEVEL_ENV = "OLLANA_LOG_LEVEL"
ROTATE_BYTES = 1_000_000  # as twistd's --logfile
ROTATED_FILES = 5  # kept besides the current one: at most 6 MB of log
LEVELS = ("debug", "info", "warn", "error", "critical")
# Lines are kept at most this long, or until this many characters wait: one write a
# batch instead of one per line (with twistd's observer, a write and the time's
# strftime were a sixth of a proxied request's CPU).
FLUSH_DELAY = 0.2
FLUSH_CHARS = 64 * 1024


def _second_and_microsecond(when: float) -> tuple[int, int]:
    """The second and microsecond that datetime.fromtimestamp makes of when (it rounds to
    the microsecond, half to even, so 5.9999996 is second 6)."""
    fraction, whole = math.modf(when)
    microsecond = round(fraction * 1e6)
    if microsecond >= 1_000_000:
        return int(whole) + 1, microsecond - 1_000_000
    if microsecond < 0:
        return int(whole) - 1, microsecond + 1_000_000
    return int(whole), microsecond


class SecondText:
    """The text make gives for a second, kept for the last second asked about: a log's
    times change once a second, for many lines."""

    def __init__(self, make: Callable[[int], str]) -> None:
        self.make = make
        self._last: tuple[int, str] | None = None  # one tuple: safe to read from any thread

    def __call__(self, second: int) -> str:
        last = self._last
        if last is None or last[0] != second:
            last = self._last = (second, self.make(second))
        return last[1]


# twistd's time (formatTime's, local with its offset) and the JSON lines' (UTC ISO 8601).
_local_second = SecondText(formatTime)
_utc_second = SecondText(
    lambda second: datetime.fromtimestamp(second, timezone.utc).replace(tzinfo=None).isoformat()
)


def local_time(when: float | None) -> str:
    """formatTime(when), as twistd's text lines have it ("-" if there is no time)."""
    if when is None:
        return "-"
    return _local_second(_second_and_microsecond(when)[0])


def utc_time(when: float) -> str:
    """datetime.fromtimestamp(when, timezone.utc).isoformat(): to the microsecond, left
    out when it is 0."""
    second, microsecond = _second_and_microsecond(when)
    if microsecond:
        return f"{_utc_second(second)}.{microsecond:06d}+00:00"
    return _utc_second(second) + "+00:00"


def message(event: LogEvent) -> str:
    """formatEvent(event), the same text, made by str.format_map when the format allows it
    (seven times faster): not for Twisted's "{name()}" calls, names after "._" (which its
    wrapper of the values would answer), flattened events, or formats that fail."""
    format = event.get("log_format")
    if (
        type(format) is str
        and "()" not in format
        and "._" not in format
        and "log_flattened" not in event
    ):
        try:
            return format.format_map(event)
        except Exception:
            pass  # formatEvent says what is wrong with it
    return formatEvent(event)


def text_line(event: LogEvent) -> str | None:
    """The event as twistd's text observer writes it (None: nothing to write):
    formatEventAsClassicLogText's text, made here for the usual event (no failure, no
    legacy system)."""
    if "log_failure" in event or "log_system" in event:
        return formatEventAsClassicLogText(event, formatTime=local_time)
    text = message(event)
    if not text:
        return None
    level = event.get("log_level")
    system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    line = f"{local_time(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


# Keys of Twisted's own bookkeeping (new and legacy events), left out of the fields (as
# is any other "log_" key). "summary" is an access line's text, already the message.
_INTERNAL = frozenset(
    {"message", "isError", "system", "time", "format", "why", "failure", "summary"}
    | {"log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time"}
)
_PLAIN = (str, int, float, bool)  # written as they are; other values as their repr


def json_line(event: LogEvent) -> str:
    """The event as one line of JSON: time, level, namespace, message, then its own fields
    (repr'd unless plain) and a failure's traceback."""
    level = event.get("log_level")
    record: dict[str, object] = {
        "time": utc_time(event.get("log_time", 0)),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": message(event),
    }
    for key, value in event.items():
        if key in _INTERNAL or key in record or key.startswith("log_"):
            continue
        record[key] = value if value is None or isinstance(value, _PLAIN) else repr(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record) + "\n"


_URGENT = frozenset({LogLevel.error, LogLevel.critical})


@implementer(ILogObserver)
class LogLines:
    """An observer writing the events at level or above as lines (format makes them) to
    out: each one at once, or, between start_batching and stop_batching (while the reactor
    runs), kept and written together FLUSH_DELAY seconds after the first, or once
    FLUSH_CHARS characters wait, or with the first error or critical event.

    A log that cannot be written loses its lines rather than stopping the caller; the next
    write that succeeds says how many were lost, and why."""

    def __init__(
        self,
        format: Callable[[LogEvent], str | None],
        out: IO[str] | LogFile,
        level: LogLevel,
        clock: IReactorTime,
        delay: float = FLUSH_DELAY,
        chars: int = FLUSH_CHARS,
    ) -> None:
        self.format = format
        self.out = out
        levels = list(LogLevel.iterconstants())
        self.levels = frozenset(levels[levels.index(level) :])
        self.clock = clock
        self.delay = delay
        self.chars = chars
        self._lines: list[str] = []
        self._size = 0  # characters in _lines
        self._due: IDelayedCall | None = None  # set while lines wait
        self._thread: int | None = None  # the reactor's, while batching
        self._lost = 0
        self._why = ""  # the first error since lines were lost

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") not in self.levels or event.get("log_namespace") is None:
            return  # as LogLevelFilterPredicate
        line = self.format(event)
        if not line:
            return
        if self._thread != threading.get_ident():
            # Not batching, or another thread (which must not touch the reactor's timers):
            # written at once, as twistd's observer does.
            self._write([line])
            return
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.chars or event["log_level"] in _URGENT:
            self.flush()
        elif self._due is None:
            self._due = self.clock.callLater(self.delay, self.flush)

    def start_batching(self) -> None:
        """Keep lines and write them together, from now on (from the reactor's thread)."""
        self._thread = threading.get_ident()

    def stop_batching(self) -> None:
        """Write the lines kept, and each line at once from now on."""
        self._thread = None
        self.flush()

    def flush(self) -> None:
        """Write the lines kept so far."""
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        said = [self._lost_line()] if self._lost else []
        try:
            if isinstance(self.out, LogFile):
                for piece in _rotated_pieces(said + lines, self.out):
                    self.out.write(piece)
            else:
                self.out.write("".join(said + lines))
            self.out.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            self._lost += len(lines)
            self._why = self._why or str(e)
        else:
            self._lost, self._why = 0, ""

    def _lost_line(self) -> str:
        event = {
            "log_time": self.clock.seconds(),
            "log_level": LogLevel.warn,
            "log_namespace": __name__,
            "log_format": "{lost} log lines could not be written ({why}) and are lost",
            "lost": self._lost,
            "why": self._why,
        }
        return self.format(event) or ""


def _rotated_pieces(lines: list[str], log_file: LogFile) -> list[str]:
    """lines joined as a piece per file, where LogFile would rotate had they been written
    one by one (it rotates before a write once the file holds rotateLength characters)."""
    limit = log_file.rotateLength
    if not limit:
        return ["".join(lines)]
    size = log_file.size if log_file.size < limit else 0  # else rotated before the write
    if size + sum(map(len, lines)) < limit:
        return ["".join(lines)]
    pieces, start = [], 0
    for end, line in enumerate(lines, 1):
        size += len(line)
        if size >= limit:
            pieces.append("".join(lines[start:end]))
            start, size = end, 0
    if start < len(lines):
        pieces.append("".join(lines[start:]))
    return pieces


def json_observer(reactor: IReactorCore | None = None) -> LogLines:
    """JSON lines: see log_observer."""
    return log_observer(json_line, os.environ, reactor or _global_reactor())


def text_observer(reactor: IReactorCore | None = None) -> LogLines:
    """twistd's own text lines: see log_observer."""
    return log_observer(text_line, os.environ, reactor or _global_reactor())


def _global_reactor() -> IReactorCore:
    # twistd calls its --logger with no arguments: the reactor it is about to run.
    from twisted.internet import reactor

    return IReactorCore(reactor)


def log_observer(
    format: Callable[[LogEvent], str | None], environ: Mapping[str, str], reactor: IReactorCore
) -> LogLines:
    """An observer for twistd's --logger (whose factories take no arguments, hence the
    environment): writing to standard output, or to the file $OLLANA_LOGFILE names,
    rotated at 1 MB with ROTATED_FILES old ones kept; only events at $OLLANA_LOG_LEVEL
    (info by default) and above, so that debug lines, some of them one per datagram,
    are written only when asked for. Lines are written in batches while the reactor
    runs, until it begins to stop (its "before shutdown" triggers, which twistd's SIGTERM
    fires): what is logged before it runs (start-up), and as it stops, is written at once."""
    path = environ.get(LOGFILE_ENV)
    out: IO[str] | LogFile = sys.stdout if not path else rotated_file(path)
    name = environ.get(LOG_LEVEL_ENV, "").strip().lower() or "info"
    level = LogLevel.levelWithName(name) if name in LEVELS else LogLevel.info
    observer = LogLines(format, out, level, IReactorTime(reactor))
    reactor.callWhenRunning(observer.start_batching)
    reactor.addSystemEventTrigger("before", "shutdown", observer.stop_batching)
    if name not in LEVELS:
        Logger(namespace=__name__, observer=observer).warn(
            "${variable} must be one of {levels}, not {name!r}: logging at info",
            variable=LOG_LEVEL_ENV, levels=", ".join(LEVELS), name=name,
        )  # fmt: skip
    return observer


def rotated_file(path: str) -> LogFile:
    """The log file at path (appended to), rotated at ROTATE_BYTES with ROTATED_FILES old
    ones kept as path.1 (the newest) to path.5."""
    return LogFile.fromFullPath(path, rotateLength=ROTATE_BYTES, maxRotatedFiles=ROTATED_FILES)


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
        self._last: tuple[str, dict[str, object]] = ("", {})

    def __call__(self, format: str, **fields: object) -> None:
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
