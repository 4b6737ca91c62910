"""ollana discover: probe the LAN for Ollana servers (LANA discovery) for a while and list
those that answered."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO, TypedDict

from twisted.internet import defer, task

from ollana import config
from ollana.auth import PacketAuth
from ollana.cli.common import table
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


class ServerRow(TypedDict):
    """What discover reports of one server (its --json, as it is)."""

    address: str
    port: int
    scheme: str
    node_id: str | None
    version: str | None
    legacy: bool


def server_rows(peers: list[Peer]) -> list[ServerRow]:
    """What discover reports of each server, in a stable order."""
    rows: list[ServerRow] = [
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


def format_table(rows: list[ServerRow]) -> str:
    header = ("ADDRESS", "PORT", "SCHEME", "NODE", "VERSION")
    return table(
        header,
        [
            (
                r["address"],
                str(r["port"]),
                r["scheme"],
                r["node_id"] or "-",
                "legacy Ollana" if r["legacy"] else r["version"] or "",
            )
            for r in rows
        ],
    )


async def discover(
    reactor: Any,  # Any: an IReactorTime and an IReactorUDP at once, which typing cannot say
    options: DiscoverOptions,
    out: TextIO,
    err: TextIO = sys.stderr,
) -> int:
    """Probe for options['timeout'] seconds, print what answered, return the exit code."""
    pool = PeerPool(reactor, ttl=float("inf"))
    addresses = options.broadcast_addresses() or tuple(default_broadcast_addresses())
    secret = options["secret"]
    seeker = Seeker(
        os.urandom(16), pool, lambda: [(a, options["discovery-port"]) for a in addresses],
        clock=reactor, auth=PacketAuth(secret, reactor) if secret is not None else None,
    )  # fmt: skip
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
