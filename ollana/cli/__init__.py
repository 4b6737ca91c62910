"""The ollana command: its subcommands (discover, status, models, ps, serve, demo and
version), and main, which parses them and runs the one given. Each command lives in a
module of this package; ollana.demo holds the demo."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.python import usage

from ollana.cli import discover, listing, serve, status
from ollana.cli.common import fail
from ollana.demo import DemoOptions, run_demo
from ollana.tap import OllanaOptions


class VersionOptions(OllanaOptions):
    synopsis = ""
    longdesc = "Print Ollana's version (as ollana --version does)."

    def postOptions(self) -> None:
        self.opt_version()


class CommandOptions(OllanaOptions):
    def getSynopsis(self) -> str:
        return "Usage: ollana" if self.subCommand else "Usage: ollana COMMAND [options]"

    longdesc = "ollana COMMAND --help describes each command."
    subCommands = [
        ["discover", None, discover.DiscoverOptions, "List the Ollana servers on the LAN."],
        ["status", None, status.StatusOptions, "Show what the Ollana on this machine is doing."],
        ["serve", None, serve.ServeOptions, "Run Ollana (twistd ollana), in the foreground or -d."],
        ["demo", None, DemoOptions, "Try Ollana on this machine alone, with a fake Ollama."],
        ["version", None, VersionOptions, "Print Ollana's version."],
        ["models", None, listing.ModelsOptions, "List every server's models (alias: list)."],
        ["list", None, listing.ModelsOptions, "The same as models."],
        ["ps", None, listing.PsOptions, "List the models loaded on every server."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "give a command: discover, status, models, ps, serve, demo or version"
            )


def main(argv: list[str] | None = None) -> None:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        if options.subCommand is None and not getattr(options, "subOptions", None):
            sys.stderr.write(f"{options}\n")
        fail(str(e), 2)
    command, sub = options.subCommand, options.subOptions
    if command == "serve":
        serve.serve(sub)
    if command == "demo":
        raise SystemExit(run_demo(sub))

    async def run(reactor: Any) -> None:  # Any: the global reactor, every interface at once
        try:
            if command == "status":
                code = await status.status(reactor, sub, sys.stdout)
            elif command in ("models", "list", "ps"):
                code = await listing.listing(reactor, sub, sys.stdout)
            else:
                code = await discover.discover(reactor, sub, sys.stdout)
        except CannotListenError as e:
            sys.stderr.write(f"ollana: cannot open a UDP socket: {e.socketError}\n")
            code = 2
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
