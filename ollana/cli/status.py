"""ollana status: what the Ollana on this machine (or at --url) is doing, from its status
page: its mode, its Ollama and, in client mode, the servers it uses."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TextIO

from twisted.internet import error
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ollana.cli.common import AskOptions, JSONObject, StatusError, get, no_answer, table
from ollana.peers import host_port

STATUS_TIMEOUT = 3.0
STATUS_PATH = "/ollana/api/status"
# Where ollana status looks without --url: client mode's port, then server mode's.
STATUS_URLS = ("http://127.0.0.1:11434", "http://127.0.0.1:11435")


class StatusOptions(AskOptions):
    synopsis = "[--url URL] [--json]"
    longdesc = (
        "Show what an Ollana on this machine (or at --url) is doing: its mode and, in client "
        "mode, the servers it uses. Without --url it asks $OLLAMA_HOST first, as the ollama "
        "command would (HOST, HOST:PORT or a URL), then http://127.0.0.1:11434 (client "
        "mode) and, if nothing Ollana answers there, http://127.0.0.1:11435 (server mode). "
        "Exits 1 when no Ollana answered."
    )
    optFlags = [["json", None, "Print the status JSON as the node serves it."]]
    optParameters = [
        ["url", "u", None, "The Ollana's address: a URL, HOST:PORT or :PORT."],
        ["timeout", "t", str(STATUS_TIMEOUT), "Seconds to wait for an answer."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        given = self.given_url()
        if self["url"] is not None:
            self["urls"] = [given]
        else:  # $OLLAMA_HOST first, if set
            self["urls"] = list(dict.fromkeys([given, *STATUS_URLS] if given else STATUS_URLS))


async def fetch_status(reactor: IReactorTime, base: str, timeout: float) -> tuple[JSONObject, str]:
    """The status of the Ollana at base, and its JSON text; StatusError saying why not."""
    accept = Headers({b"accept": [b"application/json"]})
    try:
        code, body = await get(reactor, base + STATUS_PATH, timeout, accept)
    except error.DNSLookupError:
        raise StatusError("unknown host") from None
    except Exception as e:  # any other connection failure, in one line
        raise no_answer(e, timeout) from None
    if code == 404:
        raise StatusError("HTTP 404, so not an Ollana (a plain Ollama?)")
    if code != 200:
        raise StatusError(f"HTTP {code}")
    try:
        text = body.decode("utf-8")
        status = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        raise StatusError("the answer is not JSON, so not an Ollana") from None
    if not isinstance(status, dict) or "mode" not in status:
        raise StatusError("the answer is not an Ollana's status")
    return status, text


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def format_status(status: JSONObject, url: str) -> str:
    """ollana status's table."""
    uptime = status.get("uptime_s")
    fields = [
        ("Ollana", url),
        ("Mode", str(status.get("mode", "-"))),
        ("Node", str(status.get("node_id") or "-")),
        ("Version", str(status.get("version") or "-")),
        ("Uptime", format_duration(uptime) if isinstance(uptime, int | float) else "-"),
        ("Listen", str(status.get("listen") or "-")),
    ]
    ollama = status.get("ollama")
    if isinstance(ollama, Mapping):
        if ollama.get("healthy"):
            state = f"up, version {ollama.get('version') or '?'}"
        else:
            state = f"DOWN: {ollama.get('reason') or 'no answer yet'}"
        fields.append(("Ollama", f"{ollama.get('url', '-')} ({state})"))
    load = status.get("state")
    if isinstance(load, Mapping):
        queue, limit = load.get("queue", "?"), load.get("max_queue", "?")
        fields += [
            ("Loaded", f"{_loaded(load)} (at most {load.get('max_loaded', '?')})"),
            ("Slots", f"{_slots(load)} ({load.get('parallel', '?')} per model)"),
            ("Queue", f"{queue} (Ollama queues up to {limit})"),
        ]
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]
    peers = status.get("peers") or []
    if status.get("mode") == "client":
        lines.append("")
        if not peers:
            lines.append("No servers known yet (none answered discovery, and no --peer).")
        else:
            lines.append(table(
                ("SERVER", "SOURCE", "HEALTH", "LATENCY", "ACTIVE/TOTAL", "FAILURES", "MODELS"),
                [_peer_row(peer) for peer in peers],
            ))  # fmt: skip
            if any(isinstance(p.get("state"), Mapping) for p in peers):  # servers' own load
                lines += ["", table(
                    ("SERVER", "LOADED", "SLOTS BUSY/FREE", "QUEUE"),
                    [_load_row(peer) for peer in peers],
                )]  # fmt: skip
            problems = [
                f"  {host_port(p.get('address'), p.get('port'))}: {p.get('reason')}"
                for p in peers
                if not p.get("healthy") and p.get("reason")
            ]
            if problems:
                lines += ["", "Unhealthy servers:", *problems]
    return "\n".join(lines)


def _peer_row(peer: JSONObject) -> list[str]:
    latency = peer.get("latency_ms")
    models = peer.get("models") or []
    return [
        host_port(peer.get("address", "?"), peer.get("port", "?")),
        str(peer.get("source", "-")),
        "healthy" if peer.get("healthy") else "UNHEALTHY",
        "-" if latency is None else f"{latency:.1f} ms",
        f"{peer.get('active_requests', 0)}/{peer.get('total_requests', 0)}",
        str(peer.get("failures", 0)),
        ", ".join(models) if models else "-",
    ]


def _load_row(peer: JSONObject) -> list[str]:
    load = peer.get("state")
    where = host_port(peer.get("address", "?"), peer.get("port", "?"))
    if not isinstance(load, Mapping):
        return [where, "-", "-", "-"]
    busy_free = f"{load.get('slots_busy', '?')}/{load.get('slots_free', '?')}"
    return [where, _loaded(load), busy_free, str(load.get("queue", "?"))]


def _loaded(load: JSONObject) -> str:
    return ", ".join(map(str, load.get("loaded") or [])) or "none"


def _slots(load: JSONObject) -> str:
    return f"{load.get('slots_busy', '?')} busy, {load.get('slots_free', '?')} free"


async def status(
    reactor: IReactorTime, options: StatusOptions, out: TextIO, err: TextIO = sys.stderr
) -> int:
    """Ask each URL in turn; print the first status that comes back; the exit code."""
    tried: list[tuple[str, str]] = []
    for url in options["urls"]:
        try:
            answer, text = await fetch_status(reactor, url, options["timeout"])
        except StatusError as e:
            tried.append((url, str(e)))
            continue
        notes = [f"Asked {u} first: {reason}." for u, reason in tried]
        if options["json"]:
            err.writelines(f"ollana: {note}\n" for note in notes)
            out.write(text if text.endswith("\n") else text + "\n")
        else:
            out.write(format_status(answer, url) + "\n")
            if notes:
                out.write("\n" + "\n".join(notes) + "\n")
        return 0
    err.write("ollana: no Ollana answered: " + "; ".join(f"{u}: {r}" for u, r in tried) + "\n")
    if options["url"] is None:
        err.write("Is Ollana running on this machine? Give its address with --url.\n")
    return 1
