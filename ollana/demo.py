"""``ollana demo``: a simulated Ollama, a server-mode and a client-mode Ollana in one
process, on loopback only, so that someone without Ollama sees the product work."""

from __future__ import annotations

import os
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)
from twisted.python import usage
from twisted.python.failure import Failure

from ollana import config
from ollana.tap import OllanaOptions, Options

if TYPE_CHECKING:  # imported when the demo starts
    from ollana.node import OllanaService

LOOPBACK_BROADCAST = "127.255.255.255"
DEMO_PORT = 11434


class DemoOptions(OllanaOptions):
    synopsis = "[--port N] [--pace SECONDS] [--verbose]"
    longdesc = (
        "Run a simulated Ollama (model 'echo', which streams the prompt back), a server-mode "
        "Ollana in front of it and a client-mode Ollana that finds that server by broadcast, "
        "all in this process and on loopback only; print what to try. Ctrl-C stops it."
    )
    optFlags = [["verbose", "v", "Show the nodes' log (discovery, checks, each request)."]]
    optParameters = [
        [
            "port",
            "p",
            str(DEMO_PORT),
            "Port for the client-mode Ollana on 127.0.0.1 (0: any); if it is taken, any free port.",
        ],
        ["pace", None, "0.05", "Seconds between streamed tokens."],
    ]

    def postOptions(self) -> None:
        port = str(self["port"])
        self["port"] = 0 if port == "0" else config.parse_port(port, "--port")
        try:
            pace = float(self["pace"])
        except ValueError:
            pace = -1.0
        if not 0 <= pace <= 10:
            raise usage.UsageError(f"--pace: must be 0 to 10 seconds, not {self['pace']!r}")
        self["pace"] = pace


def tcp_port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener could bind host:port now (as Twisted binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_udp_port() -> int:
    """A UDP port that nothing uses at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_options(*args: str) -> Options:
    """A loopback-only node's options: the demo's nodes listen and broadcast on loopback."""
    options = Options()
    # Quick checks and a short drain, so that the demo is lively and Ctrl-C is quick.
    extra = ["--health-interval", "2", "--probe-interval", "2", "--models-interval", "5",
             "--drain-timeout", "2"]  # fmt: skip
    options.parseOptions(["--broadcast", LOOPBACK_BROADCAST, *extra, *args])
    return options


class Demo:
    """The demo's pieces, started and stopped together on one reactor (the running one:
    also its IReactorCore, IReactorFromThreads, IReactorTCP, IReactorUDP)."""

    def __init__(
        self, reactor: IReactorTime, options: DemoOptions, out: TextIO, err: TextIO
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.err = err
        self.exit_code = 0
        self.nodes: list[OllanaService] = []
        self.ollama_port: IListeningPort | None = None
        self._stopping = False
        self._signals = 0

    def start(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(number) is not signal.SIG_IGN:  # as a background job's SIGINT
                signal.signal(number, self._signalled)
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed)

    def _signalled(self, number: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(128 + number)  # a second Ctrl-C: do not wait for anything
        IReactorFromThreads(self.reactor).callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        reactor = IReactorCore(self.reactor)
        if reactor.running and not self._stopping:
            reactor.stop()

    def _failed(self, failure: Failure) -> None:
        self.err.write(f"ollana demo: {failure.getErrorMessage()}\n")
        self.exit_code = 1
        self._stop_reactor()

    async def _start(self) -> None:
        from ollana.simulator import ECHO_MODEL, FakeOllama
        from ollana.tap import makeService

        reactor = self.reactor
        fake = FakeOllama(models=[ECHO_MODEL], clock=reactor, record=False)
        fake.pace = self.options["pace"]
        site = fake.site(access_log=False)  # the server's access lines say it all
        endpoint = TCP4ServerEndpoint(IReactorTCP(reactor), 0, interface="127.0.0.1")
        listening: IListeningPort = await endpoint.listen(site)
        self.ollama_port = listening
        ollama = f"http://127.0.0.1:{listening.getHost().port}"  # type: ignore[attr-defined]
        discovery = str(free_udp_port())
        loopback = "tcp:0:interface=127.0.0.1"

        server = makeService(node_options(
            "--mode", "server", "--ollama", ollama, "--listen", loopback,
            "--discovery-port", discovery,
        ), reactor=reactor)  # fmt: skip
        self.nodes.append(server)
        server.startService()
        server_port = await self._listening(server)

        wanted = self.options["port"]
        note = ""
        if wanted and not tcp_port_is_free(wanted):
            note = f"  (127.0.0.1:{wanted} is taken, perhaps by Ollama itself; the client uses "
            wanted = 0
        client = makeService(node_options(
            "--mode", "client", "--listen", f"tcp:{wanted}:interface=127.0.0.1",
            "--discovery-port", discovery,
        ), reactor=reactor)  # fmt: skip
        self.nodes.append(client)
        client.startService()
        port = await self._listening(client)
        if note:
            note += f"127.0.0.1:{port}.)\n"
        found = await self._found(client, ECHO_MODEL)
        if found is None:
            raise RuntimeError(
                f"the client did not find the server by broadcast to {LOOPBACK_BROADCAST} "
                f"on UDP port {discovery} within 15 s (is loopback broadcast blocked here?)"
            )
        self.out.write(f"""\
Ollana demo, on loopback only (nothing leaves this machine):

  simulated Ollama:    {ollama} (model "echo" streams the prompt back)
  Ollana, server mode: http://127.0.0.1:{server_port} (in front of the simulated Ollama)
  Ollana, client mode: http://127.0.0.1:{port} (found the server at {found}
                       by broadcast to {LOOPBACK_BROADCAST}, UDP port {discovery})
{note}
Try, in another terminal:

  curl http://127.0.0.1:{port}/api/generate -d '{{"model":"echo","prompt":"hello there"}}'
  OLLAMA_HOST=127.0.0.1:{port} ollama run echo hi
  ollana status --url http://127.0.0.1:{port}
  dashboard: http://127.0.0.1:{port}/ollana/

Ctrl-C stops the demo.
""")  # fmt: skip
        self.out.flush()

    async def _listening(self, node: OllanaService) -> int:
        port: int = await node.whenListening().addTimeout(10, self.reactor)
        return port

    async def _found(self, client: OllanaService, model: str, deadline: float = 15) -> str | None:
        """Wait until the client knows a healthy server that has model; its address."""
        for _ in range(int(deadline / 0.1)):
            for peer in client.pool:
                if peer.healthy and model in peer.models:
                    return peer.address
            if client.failure is not None:
                raise RuntimeError(client.failure)
            await task.deferLater(self.reactor, 0.1)
        return None

    def stop(self) -> defer.Deferred[None]:
        """Stop the client, then the server, then the simulated Ollama."""
        self._stopping = True
        for node in self.nodes:
            if node.failure is not None:
                self.exit_code = 1

        async def run() -> None:
            if self._signals:
                self.out.write("Stopping...\n")
                self.out.flush()
            for node in reversed(self.nodes):
                if node.running:
                    await defer.maybeDeferred(node.stopService)
            stopped = self.ollama_port.stopListening() if self.ollama_port is not None else None
            if stopped is not None:
                await stopped
            if self._signals:
                self.out.write("Stopped.\n")
                self.out.flush()

        return defer.Deferred.fromCoroutine(run())


def begin_demo_logging(verbose: bool, out: TextIO, err: TextIO) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Verbose: what happens, from info up; else only what went wrong.
    level = LogLevel.info if verbose else LogLevel.error
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    observer = FilteringLogObserver(textFileLogObserver(out if verbose else err), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def run_demo(options: DemoOptions) -> int:
    from twisted.internet import reactor

    begin_demo_logging(options["verbose"], sys.stdout, sys.stderr)
    demo = Demo(reactor, options, sys.stdout, sys.stderr)
    reactor.callWhenRunning(demo.start)
    reactor.addSystemEventTrigger("before", "shutdown", demo.stop)
    reactor.run()
    return demo.exit_code


# --- the command ----------------------------------------------------------------------
