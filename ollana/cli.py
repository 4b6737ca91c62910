"""The ollana command: ollana discover (and, later, more)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.python import usage

from ollana import config
from ollana.discovery import Seeker
from ollana.netif import default_broadcast_addresses
from ollana.peers import Peer, PeerPool, Source
from ollana.tap import DiscoveryOptions

REPEAT_PROBE = 0.5


class DiscoverOptions(DiscoveryOptions):
    synopsis = "[--timeout SECONDS] [--broadcast ADDR]... [--discovery-port N] [--json]"
    longdesc = "Probe the LAN for Ollana servers and list them. Exits 1 when none answered."
    optFlags = [["json", None, "Print JSON instead of a table."]]
    optParameters = [["timeout", "t", "2", "Seconds to wait for answers."]]

    def postOptions(self) -> None:
        super().postOptions()
        self["timeout"] = config.parse_seconds(str(self["timeout"]), "--timeout")


class CommandOptions(usage.Options):
    synopsis = "COMMAND [options]"
    subCommands = [["discover", None, DiscoverOptions, "List the Ollana servers on the LAN."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: discover")


def server_rows(peers: list[Peer]) -> list[dict[str, Any]]:
    """What discover reports of each server, in a stable order."""
    rows = [
        {
            "address": p.host,
            "port": p.port,
            "scheme": p.scheme,
            "node_id": p.node_id,
            "version": p.version if p.source is not Source.LEGACY else None,
            "legacy": p.source is Source.LEGACY,
        }
        for p in peers
    ]
    return sorted(rows, key=lambda r: (r["address"], r["port"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("ADDRESS", "PORT", "SCHEME", "NODE", "VERSION")
    lines = [header] + [
        (
            r["address"],
            str(r["port"]),
            r["scheme"],
            r["node_id"] or "-",
            "legacy Ollana" if r["legacy"] else r["version"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


async def discover(
    reactor: Any, options: DiscoverOptions, out: TextIO, err: TextIO = sys.stderr
) -> int:
    """Probe for options['timeout'] seconds, print what answered, return the exit code."""
    pool = PeerPool(reactor, ttl=float("inf"))
    addresses = options.broadcast_addresses() or tuple(default_broadcast_addresses())
    seeker = Seeker(
        os.urandom(16), pool, lambda: [(a, options["discovery-port"]) for a in addresses]
    )
    port = reactor.listenUDP(0, seeker)
    port.setBroadcastAllowed(True)
    loop = task.LoopingCall(seeker.probe)
    loop.clock = reactor
    loop.start(REPEAT_PROBE, now=True)
    await task.deferLater(reactor, options["timeout"])
    loop.stop()
    await defer.maybeDeferred(port.stopListening)
    if seeker.sent == 0:
        err.write(f"ollana: could not send any probe (last error: {seeker.last_send_error})\n")
    rows = server_rows(list(pool))
    if options["json"]:
        out.write(json.dumps(rows, indent=2) + "\n")
    elif rows:
        out.write(format_table(rows) + "\n")
    else:
        out.write(f"No Ollana server answered within {options['timeout']:g} s.\n")
    return 0 if rows else 1


def main(argv: list[str] | None = None) -> None:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{getattr(options, 'subOptions', None) or options}\nollana: {e}\n")
        raise SystemExit(2) from None

    async def run(reactor: Any) -> None:
        try:
            code = await discover(reactor, options.subOptions, sys.stdout)
        except CannotListenError as e:
            sys.stderr.write(f"ollana: cannot open a UDP socket: {e.socketError}\n")
            code = 2
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
