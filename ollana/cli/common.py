"""What the ollana commands share: asking an Ollana over HTTP (--url, --timeout and
$OLLAMA_HOST; one-line reasons when it gives no answer), plain tables, and the one-line
error exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ollana import config
from ollana.tap import OllanaOptions

# A decoded JSON object as an Ollana serves it. Any: its values may have any shape, and the
# code that reads them checks what it uses.
JSONObject = Mapping[str, Any]


class AskOptions(OllanaOptions):
    """The options of a command that asks an Ollana: its subclass declares --url and
    --timeout; $OLLAMA_HOST (in environ) is where the ollama command would ask."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self["timeout"] = config.parse_seconds(str(self["timeout"]), "--timeout")

    def given_url(self) -> str | None:
        """--url, else $OLLAMA_HOST, as a base URL; None when neither is given."""
        if self["url"] is not None:
            return config.parse_ollama_url(self["url"], "--url")
        host = self.environ.get("OLLAMA_HOST", "").strip()
        return config.parse_ollama_url(host, "OLLAMA_HOST") if host else None


class StatusError(Exception):
    """Why an address gave no answer (a status or a listing)."""


async def get(
    reactor: IReactorTime, url: str, timeout: float, headers: Headers | None = None
) -> tuple[int, bytes]:
    """GET url on a fresh, unpooled connection: the status code and the body, within
    timeout seconds. The reactor must also provide IReactorTCP, for the Agent."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, False))
    http = HTTPClient(agent)

    async def ask() -> tuple[int, bytes]:
        response = await http.get(url, headers=headers)
        return response.code, await response.content()

    return await defer.Deferred.fromCoroutine(ask()).addTimeout(timeout, reactor)


def no_answer(e: Exception, timeout: float) -> StatusError:
    """Why get() failed, in one line."""
    if isinstance(e, error.ConnectionRefusedError):
        return StatusError("connection refused")
    if isinstance(e, defer.TimeoutError | defer.CancelledError | error.TimeoutError):
        return StatusError(f"no answer within {timeout:g} s")
    reasons = getattr(e, "reasons", None)  # twisted.web's ResponseNeverReceived and friends
    if reasons:
        return StatusError("; ".join(r.getErrorMessage() for r in reasons))
    return StatusError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell, two spaces apart."""
    lines = [list(header), *[list(row) for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fail(message: str, code: int) -> NoReturn:
    """Say what went wrong in one line on standard error, and exit with code."""
    sys.stderr.write(f"ollana: {message}\n")
    raise SystemExit(code)
