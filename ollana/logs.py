"""Log output for people and for machines.

``json_observer`` writes one JSON object per event and line, for log shippers: time,
level, namespace, the message as text, and the event's own fields (method, status, peer,
duration_ms... for access lines). Use it with ``twistd --logger ollana.logs.json_observer``
or ``ollana serve --log-format json``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
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


def json_observer() -> ILogObserver:
    """JSON lines on standard output, or appended to the file $OLLANA_LOGFILE names (a
    factory, as twistd's --logger wants: it takes no arguments)."""
    path = os.environ.get(LOGFILE_ENV)
    out = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115 (kept open)
    return JSONLines(out)
