"""ollana models (ollana list) and ollana ps: the merged /api/tags and /api/ps of a
client-mode Ollana, as ollama list and ollama ps show them, with the servers of each model."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TextIO

from twisted.internet.interfaces import IReactorTime

from ollana.cli.common import AskOptions, JSONObject, StatusError, get, no_answer, table
from ollana.listings import SERVERS_FIELD

LISTING_URL = "http://127.0.0.1:11434"  # where models and ps ask without --url or $OLLAMA_HOST
LISTING_TIMEOUT = 15.0  # a client asks every server, which may take its listing timeout


class ListingOptions(AskOptions):
    """What ollana models and ollana ps take: the client-mode Ollana to ask."""

    synopsis = "[--url URL] [--json]"
    path = "/api/tags"
    optFlags = [["json", None, "Print the listing's JSON as the Ollana serves it."]]
    optParameters = [
        [
            "url",
            "u",
            None,
            "The client-mode Ollana: a URL, HOST:PORT or :PORT "
            "[default: $OLLAMA_HOST, else 127.0.0.1:11434].",
        ],
        ["timeout", "t", str(LISTING_TIMEOUT), "Seconds to wait for an answer."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["base"] = self.given_url() or LISTING_URL


class ModelsOptions(ListingOptions):
    longdesc = (
        "List the models of every server, as ollama list does, with the servers that have "
        "each: the merged /api/tags of the client-mode Ollana on this machine (or at --url, "
        "or $OLLAMA_HOST). Exits 1 when it did not answer."
    )


class PsOptions(ListingOptions):
    path = "/api/ps"
    longdesc = (
        "List the models loaded on every server, as ollama ps does, with the servers that "
        "have each loaded: the merged /api/ps of the client-mode Ollana on this machine (or "
        "at --url, or $OLLAMA_HOST). Exits 1 when it did not answer."
    )


def human_bytes(value: object) -> str:
    """A size as ollama list shows it: decimal units, one decimal below 10 of them."""
    if not isinstance(value, int | float) or value < 0:
        return "-"
    number, unit = float(value), "B"
    for name, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            number, unit = value / scale, name
            break
    if number >= 10 or number == int(number):
        return f"{int(number)} {unit}"
    return f"{number:.1f} {unit}"


def parse_time(text: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as Ollama writes them (nanoseconds)."""
    if not isinstance(text, str):
        return None
    found = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text.strip())
    if found is None:
        return None
    stamp, fraction, zone = found.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    try:
        seconds = datetime.fromisoformat(stamp + zone).timestamp()
    except ValueError:
        return None
    return seconds + (float("0" + fraction) if fraction else 0.0)


TIME_UNITS = (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
              ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))  # fmt: skip


def human_time(then: float | None, now: float) -> str:
    """How long ago (or from now) then is, in ollama list's and ollama ps's words."""
    if then is None:
        return "-"
    delta = now - then
    words = "ago" if delta >= 0 else "from now"
    delta = abs(delta)
    if delta > 20 * 365 * 86400:
        return "Forever" if words == "from now" else "long ago"
    if delta < 1:
        return "Less than a second " + words
    for name, seconds in TIME_UNITS:
        if delta >= seconds:
            count = int(delta // seconds)
            return f"{count} {name}{'s' if count != 1 else ''} {words}"
    return words  # not reached


def _servers(entry: JSONObject) -> str:
    servers = entry.get(SERVERS_FIELD)
    return ", ".join(map(str, servers)) if isinstance(servers, list) and servers else "-"


def format_models(entries: Sequence[JSONObject], now: float) -> str:
    """ollana models's table: ollama list's columns, and the servers that have each model."""
    rows = [
        [str(entry.get("name", "?")), str(entry.get("digest") or "")[:12] or "-",
         human_bytes(entry.get("size")), human_time(parse_time(entry.get("modified_at")), now),
         _servers(entry)]
        for entry in entries
    ]  # fmt: skip
    return table(("NAME", "ID", "SIZE", "MODIFIED", "SERVERS"), rows)


def processor(entry: JSONObject) -> str:
    """Where a loaded model runs, as ollama ps says it."""
    size, vram = entry.get("size"), entry.get("size_vram")
    if not isinstance(size, int | float) or not isinstance(vram, int | float) or size <= 0:
        return "-"
    gpu = round(100 * min(vram, size) / size)
    if gpu == 100:
        return "100% GPU"
    if gpu == 0:
        return "100% CPU"
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def format_ps(entries: Sequence[JSONObject], now: float) -> str:
    """ollana ps's table: ollama ps's columns, and the servers that have each model loaded."""
    rows = []
    for entry in entries:
        until = parse_time(entry.get("expires_at"))
        context = entry.get("context_length")
        rows.append([
            str(entry.get("name", "?")), str(entry.get("digest") or "")[:12] or "-",
            human_bytes(entry.get("size")), processor(entry),
            str(context) if isinstance(context, int) else "-",
            "Stopping..." if until is not None and until <= now else human_time(until, now),
            _servers(entry),
        ])  # fmt: skip
    header = ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL", "SERVERS")
    return table(header, rows)


async def fetch_listing(reactor: IReactorTime, url: str, timeout: float) -> tuple[JSONObject, str]:
    """The JSON answer to GET url, and its text; StatusError saying why there is none."""
    try:
        code, body = await get(reactor, url, timeout)
    except Exception as e:  # any connection failure, in one line
        raise no_answer(e, timeout) from None
    try:
        text = body.decode("utf-8")
        answer = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        raise StatusError(f"HTTP {code}, and the answer is not JSON") from None
    if code != 200:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise StatusError(f"HTTP {code}" + (f": {message}" if message else ""))
    if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
        raise StatusError("the answer is not a listing of models")
    return answer, text


async def listing(
    reactor: IReactorTime, options: ListingOptions, out: TextIO, err: TextIO = sys.stderr
) -> int:
    """ollana models or ollana ps: print the listing; the exit code."""
    url = options["base"] + options.path
    try:
        answer, text = await fetch_listing(reactor, url, options["timeout"])
    except StatusError as e:
        err.write(f"ollana: no listing from {url}: {e}\n")
        return 1
    if options["json"]:
        out.write(text if text.endswith("\n") else text + "\n")
        return 0
    entries = [entry for entry in answer["models"] if isinstance(entry, Mapping)]
    format_listing = format_ps if isinstance(options, PsOptions) else format_models
    out.write(format_listing(entries, reactor.seconds()) + "\n")
    return 0
