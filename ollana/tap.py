"""twistd ollana: command-line options and the service maker.

This is the only module that touches the global reactor and the machine's interfaces.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, Protocol, TypedDict, TypeGuard

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IAddress,
    IReactorFromThreads,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from ollana import __version__, config
from ollana.auth import load_secret
from ollana.config import Settings
from ollana.gate import parse_network
from ollana.load import environment_limits
from ollana.peers import host_port
from ollana.strategy import DEFAULT as DEFAULT_STRATEGY
from ollana.strategy import STRATEGIES

if TYPE_CHECKING:  # made in makeService, which imports it when it is called
    from ollana.node import OllanaService

log = Logger()

# ollana serve -d: the pipe on which the daemon says, in one line, that it listens
# ("ready PID ADDRESS") or why it could not start ("failed REASON").
READY_FD_ENV = "OLLANA_READY_FD"
START_CHECK = 0.1  # seconds between looks at whether the daemon listens yet

# The headings of twistd ollana --help (and ollana serve --help), with their options.
OPTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Mode", ("mode", "ollama", "listen")),
    ("Discovery", ("no-discovery", "broadcast", "discovery-port", "discovery-interface",
                   "probe-interval", "peer")),
    ("Routing", ("strategy", "attempts", "health-interval", "unhealthy-after",
                 "models-interval", "scan-limit", "ollama-parallel", "ollama-max-queue",
                 "ollama-max-loaded")),
    ("Security", ("secret-file", "allow", "tls", "tls-cert", "tls-key", "tls-dir", "tls-ca")),
    ("Limits", ("max-connections", "max-body", "header-timeout", "connect-timeout",
                "first-byte-timeout", "idle-timeout", "drain-timeout")),
    ("Logging", ()),
    ("Other", ("help", "version")),
)  # fmt: skip
LOGGING_NOTE = (
    "twistd's --logger ollana.logs.text_observer (or ollana.logs.json_observer) writes "
    "the lines at $OLLANA_LOG_LEVEL (debug, info, warn, error or critical; default info) "
    "and above, to the file $OLLANA_LOGFILE names, rotated and capped; ollana serve sets both."
)


class OllanaOptions(usage.Options):
    """Options whose --version is Ollana's (usage.Options would print Twisted's)."""

    def opt_version(self) -> NoReturn:
        """Display Ollana's version and exit."""
        print(f"ollana {__version__}")
        sys.exit(0)


class OptionEntry(TypedDict):
    """One option as usage.docMakeChunks takes it."""

    long: str
    short: str | None
    doc: str | None
    optType: str
    default: object


def option_entries(options: usage.Options) -> dict[str, OptionEntry]:
    """Each long option of options, by name, as usage.docMakeChunks takes it."""
    short = {long: key for key, long in options.synonyms.items() if len(key) == 1}
    entries: dict[str, OptionEntry] = {}
    for declared in options.longOpt:
        name = declared.rstrip("=")
        entries[name] = {
            "long": name,
            "short": short.get(name),
            "doc": options.docs.get(name),
            "optType": "parameter" if declared.endswith("=") else "flag",
            "default": options.defaults.get(name),
        }
    return entries


def grouped_usage(
    entries: Mapping[str, OptionEntry],
    groups: Sequence[tuple[str, Sequence[str]]],
    width: int | None = None,
    notes: Mapping[str, str] | None = None,
) -> str:
    """Help text with the options under headings, in the groups' order, columns aligned
    across all of them; an option in no group is listed under the last heading, a heading
    with neither options nor a note is left out."""
    width = width or int(os.environ.get("COLUMNS", "80"))
    listed = list(entries.values())
    chunks = usage.docMakeChunks(listed, width)  # sorts listed as it makes its chunks
    text = dict(zip([entry["long"] for entry in listed], chunks, strict=True))
    grouped = {name for _, names in groups for name in names}
    rest = [entry["long"] for entry in listed if entry["long"] not in grouped]
    parts = []
    for i, (heading, names) in enumerate(groups):
        shown = [name for name in names if name in text]
        if i == len(groups) - 1:
            shown += rest
        note = (notes or {}).get(heading)
        if shown or note:
            body = "".join(text[name] for name in shown)
            if note:
                body += "".join(f"  {line}\n" for line in textwrap.wrap(note, width - 2))
            parts.append(f"{heading}:\n{body}")
    return "\n".join(parts)


class DiscoveryOptions(OllanaOptions):
    """The discovery options that both twistd ollana and ollana discover take."""

    optParameters = [
        ["discovery-port", None, str(config.DISCOVERY_PORT), "UDP port of LANA discovery."],
        [
            "secret-file",
            None,
            None,
            "File holding the LAN's shared secret [default: $OLLANA_SECRET, else none]: "
            "discovery is authenticated and servers admit only nodes that know it.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["broadcast"] = []

    def opt_broadcast(self, address: str) -> None:
        """IPv4 address to send discovery broadcasts to (repeatable) [default: the broadcast address of every up, non-loopback interface]."""  # noqa: E501 (usage help)
        self["broadcast"].append(config.parse_ipv4(address, "--broadcast"))

    def postOptions(self) -> None:
        self["discovery-port"] = config.parse_port(str(self["discovery-port"]), "--discovery-port")
        self["secret"] = load_secret(self["secret-file"], os.environ)

    def broadcast_addresses(self) -> tuple[str, ...] | None:
        """The addresses given, or None for this machine's own."""
        return tuple(self["broadcast"]) or None


class Options(DiscoveryOptions):
    synopsis = "[options]"
    longdesc = (
        "Ollana makes the Ollama servers of a LAN usable from every device. On a machine "
        "with Ollama it serves the LAN (server mode); elsewhere it finds those servers and "
        "serves 127.0.0.1:11434 for local apps (client mode)."
    )
    optFlags = [
        ["no-discovery", None, "Neither send nor answer LANA discovery datagrams."],
        [
            "tls",
            None,
            "Serve the LAN over HTTPS (server mode), with a self-signed certificate "
            "made on first run unless --tls-cert is given; clients pin it.",
        ],
    ]
    optParameters = [
        [
            "mode",
            None,
            "auto",
            "auto, server or client; auto picks server when a local Ollama answers.",
        ],
        [
            "ollama",
            None,
            None,
            "Local Ollama URL [default: $OLLAMA_HOST or http://127.0.0.1:11434].",
        ],
        [
            "listen",
            None,
            None,
            "Endpoint for the HTTP proxy [default: tcp:11434:interface=127.0.0.1 in client mode, "
            "tcp:11435 in server mode].",
        ],
        [
            "discovery-interface",
            None,
            None,
            "IPv4 address to bind the discovery socket to [default: all].",
        ],
        ["probe-interval", None, "5", "Seconds between discovery probes (client mode)."],
        ["health-interval", None, "5", "Seconds between health checks."],
        ["connect-timeout", None, "5", "Seconds to wait for a connection to an upstream."],
        [
            "first-byte-timeout",
            None,
            "300",
            "Seconds an upstream may take to start answering a request it has read (a model "
            "may be loading) before it is given up, or tried elsewhere.",
        ],
        [
            "idle-timeout",
            None,
            "120",
            "Seconds an upstream may keep a request waiting otherwise (not reading its body, "
            "silent within the response) before the request is given up.",
        ],
        [
            "strategy",
            None,
            DEFAULT_STRATEGY,
            "How client mode picks a server: ttft (by the servers' reported load, loaded "
            "models and the conversation's prompt cache), fastest, least-connections or "
            "round-robin.",
        ],
        [
            "ollama-parallel",
            None,
            None,
            "Server mode: slots per loaded model of the local Ollama, as reported to clients "
            "[default: $OLLAMA_NUM_PARALLEL, else 1].",
        ],
        [
            "ollama-max-queue",
            None,
            None,
            "Server mode: requests the local Ollama queues [default: $OLLAMA_MAX_QUEUE, else 512].",
        ],
        [
            "ollama-max-loaded",
            None,
            None,
            "Server mode: models the local Ollama keeps loaded "
            "[default: $OLLAMA_MAX_LOADED_MODELS, else 3].",
        ],
        [
            "unhealthy-after",
            None,
            "2",
            "Failed health checks in a row after which a server is no longer used.",
        ],
        ["models-interval", None, "30", "Seconds between refreshes of each server's models."],
        [
            "scan-limit",
            None,
            "8M",
            "How much of a request body is read for its model (and kept to retry elsewhere).",
        ],
        ["attempts", None, "3", "Servers tried for one request before giving up (client mode)."],
        [
            "drain-timeout",
            None,
            "30",
            "Seconds to let requests under way finish when stopping, before closing them.",
        ],
        ["max-body", None, "off", "Largest request body accepted (like 10G), or off."],
        ["max-connections", None, "256", "Connections one source may hold open (server mode)."],
        ["header-timeout", None, "30", "Seconds a client may take to send request headers."],
        [
            "tls-dir",
            None,
            None,
            "Where the self-signed certificate is kept "
            "[default: $XDG_DATA_HOME/ollana or ~/.local/share/ollana].",
        ],
        ["tls-cert", None, None, "A CA-issued certificate (PEM, chain after it) to serve."],
        ["tls-key", None, None, "The private key (PEM) of --tls-cert."],
        [
            "tls-ca",
            None,
            None,
            "CA certificate(s) (PEM) that servers' certificates must "
            "chain to (client mode); else announced fingerprints are pinned.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []
        self["allow"] = []

    def opt_allow(self, network: str) -> None:
        """Source address or CIDR block the server admits (repeatable) [default: loopback, private, link-local and unique-local ranges]."""  # noqa: E501 (usage help)
        self["allow"].append(parse_network(network))

    def opt_peer(self, peer: str) -> None:
        """A server to use besides discovered ones, as HOST:PORT (repeatable)."""
        self["peer"].append(config.parse_peer(peer))

    def postOptions(self) -> None:
        super().postOptions()
        if self["mode"] not in config.MODES:
            raise usage.UsageError(f"--mode: must be auto, server or client, not {self['mode']!r}")
        ollama = self["ollama"]
        option = "--ollama"
        if ollama is None:
            ollama = os.environ.get("OLLAMA_HOST") or config.DEFAULT_OLLAMA
            option = "OLLAMA_HOST"
        self["ollama"] = config.parse_ollama_url(ollama, option)
        if self["listen"] is not None:
            config.check_endpoint(self["listen"])
            announced = self["mode"] != "client" and not self["no-discovery"]
            if announced and config.endpoint_type(self["listen"]) not in ("tcp", "tcp6", "ssl"):
                raise usage.UsageError(
                    "--listen: a server announces a TCP port, so use a tcp: or ssl: endpoint "
                    "(or --mode client, or --no-discovery)"
                )
        if self["discovery-interface"] is None:
            self["discovery-interface"] = ""
        else:
            self["discovery-interface"] = config.parse_ipv4(
                self["discovery-interface"], "--discovery-interface"
            )
        seconds = ("probe-interval", "health-interval", "connect-timeout", "idle-timeout",
                   "first-byte-timeout", "models-interval", "drain-timeout",
                   "header-timeout")  # fmt: skip
        for name in seconds:
            self[name] = config.parse_seconds(str(self[name]), "--" + name)
        if self["strategy"] not in STRATEGIES:
            raise usage.UsageError(
                f"--strategy: must be one of {', '.join(STRATEGIES)}, not {self['strategy']!r}"
            )
        self["unhealthy-after"] = config.parse_count(str(self["unhealthy-after"]),
                                                     "--unhealthy-after")  # fmt: skip
        self["attempts"] = config.parse_count(str(self["attempts"]), "--attempts", most=10)
        limits = list(environment_limits())
        for i, name in enumerate(("ollama-parallel", "ollama-max-queue", "ollama-max-loaded")):
            if self[name] is not None:
                limits[i] = config.parse_count(str(self[name]), "--" + name, most=1 << 20)
        self["ollama-limits"] = tuple(limits)
        self["scan-limit"] = config.parse_size(str(self["scan-limit"]), "--scan-limit")
        max_body = str(self["max-body"])
        self["max-body"] = (
            None if max_body == "off" else config.parse_size(max_body, "--max-body", most=1 << 50)
        )
        self["max-connections"] = config.parse_count(
            str(self["max-connections"]), "--max-connections", most=100000
        )
        if self["mode"] != "server" and self["no-discovery"] and not self["peer"]:
            raise usage.UsageError(  # auto mode would be a client that finds no server
                f"--no-discovery in {self['mode']} mode needs at least one --peer"
                + (" (or --mode server)" if self["mode"] == "auto" else "")
            )
        self._check_tls()

    def getUsage(self, width: int | None = None) -> str:
        """The options under headings (usage.Options lists them in one)."""
        width = width or int(os.environ.get("COLUMNS", "80"))
        options = grouped_usage(option_entries(self), OPTION_GROUPS, width,
                                {"Logging": LOGGING_NOTE})  # fmt: skip
        return options + "\n" + "\n".join(textwrap.wrap(self.longdesc, width)) + "\n"

    def _check_tls(self) -> None:
        """Load or make the server's certificate and read the clients' CA now, so that a
        problem stops Ollana before it starts, in one line."""
        from ollana import tls

        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        self["server-tls"] = None
        try:
            if cert is not None:
                self["server-tls"] = tls.load_certificate(cert, key)
            elif self["tls"]:
                self["server-tls"] = tls.ensure_self_signed(
                    self["tls-dir"] or tls.default_data_dir(os.environ)
                )
            if self["server-tls"] is not None and self["mode"] != "client":
                listen = self["listen"] or config.SERVER_LISTEN
                self["server-tls"].listen_description(listen)
            if self["tls-ca"] is not None:
                tls.ClientTLS(self["tls-ca"])
        except (tls.TLSSetupError, ValueError) as e:
            raise usage.UsageError(f"--tls: {e}") from None

    def settings(self) -> Settings:
        """The validated options as Settings (looks up broadcast addresses if needed)."""
        discovery = not self["no-discovery"]
        return Settings(
            mode=self["mode"],
            ollama_url=self["ollama"],
            listen=self["listen"],
            discovery=discovery,
            discovery_port=self["discovery-port"],
            discovery_interface=self["discovery-interface"],
            broadcast=self.broadcast_addresses() if discovery else (),
            probe_interval=self["probe-interval"],
            health_interval=self["health-interval"],
            peers=tuple(self["peer"]),
            connect_timeout=self["connect-timeout"],
            idle_timeout=self["idle-timeout"],
            first_byte_timeout=self["first-byte-timeout"],
            strategy=self["strategy"],
            unhealthy_after=self["unhealthy-after"],
            models_interval=self["models-interval"],
            scan_limit=self["scan-limit"],
            attempts=self["attempts"],
            ollama_limits=self["ollama-limits"],
            drain_timeout=self["drain-timeout"],
            secret=self["secret"],
            allow=tuple(self["allow"]) or None,
            max_body=self["max-body"],
            max_connections=self["max-connections"],
            header_timeout=self["header-timeout"],
            tls=self["server-tls"],
            tls_ca=self["tls-ca"],
        )


def makeService(options: Options, reactor: IReactorTime | None = None) -> OllanaService:
    """The Ollana service for twistd, on the global reactor unless given another (which is
    also the IReactorTCP, IReactorUDP and IReactorMulticast the node uses)."""
    if reactor is not None:
        return node_service(options.settings(), reactor)
    from twisted.internet import reactor as running

    from ollana.limits import raise_open_files

    raise_open_files()  # first: the listeners' connection caps are sized from it
    service = node_service(options.settings(), running)
    ready = os.environ.pop(READY_FD_ENV, None)
    report = StartReport(int(ready) if ready and ready.isdigit() else None)
    atexit.register(_exit_if_failed, service, report)
    running.callWhenRunning(report.watch, service, running)
    running.callWhenRunning(SecondSignal(running).install)
    # What start-up made (modules, settings) lives as long as the process: moved out of
    # the cyclic collector's view, full collections no longer stall the proxy for tens
    # of milliseconds (p99 of a small GET at 32 connections: 46 -> 28 ms).
    running.callWhenRunning(gc.freeze)
    return service


def node_service(settings: Settings, reactor: IReactorTime) -> OllanaService:
    """An Ollana node on reactor, whose client pins what the servers it knows announce."""
    from ollana.health import AgentGetter
    from ollana.netif import default_broadcast_addresses
    from ollana.node import HEALTH_TIMEOUT, ConnectionPoolService, OllanaService, peer_pool
    from ollana.tls import ClientTLS
    from ollana.upstream import make_agent

    pool = peer_pool(settings, reactor)
    client_tls = ClientTLS(settings.tls_ca, pins=pool.fingerprint)
    # Health checks, model lists and merged listings go through the relaying client too:
    # kept-alive connections, and response heads bounded as a hostile server's must be.
    agent = make_agent(reactor, HEALTH_TIMEOUT, client_tls.creator_for)
    service = OllanaService(settings, reactor, AgentGetter(agent), default_broadcast_addresses,
                            client_tls, pool)  # fmt: skip
    health_connections = ConnectionPoolService(agent)
    health_connections.setName("health-connections")
    health_connections.setServiceParent(service)
    return service


class Starting(Protocol):
    """What StartReport reads of the node it reports on (an OllanaService)."""

    failure: str | None  # why it could not start

    def address(self) -> IAddress | None:
        """Where it listens for HTTP, once it does."""


class StartReport:
    """Tells ollana serve -d, on the pipe it gave (a file descriptor; None: nobody asks),
    once the daemon listens, with its process id and address, or why it could not start:
    one line, then the pipe is closed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._loop: LoopingCall | None = None

    def watch(self, service: Starting, clock: IReactorTime, interval: float = START_CHECK) -> None:
        """Look at the service every interval seconds until it listens or has failed."""
        if self.fd is None:
            return

        def look() -> None:
            try:
                line = start_line(service, os.getpid())
            except Exception:
                log.failure("Could not tell whether Ollana listens")
                line = "failed could not tell whether Ollana listens; see its log"
            if line is not None:
                self.say(line)

        self._loop = LoopingCall(look)
        self._loop.clock = clock
        self._loop.start(interval, now=True)

    def say(self, line: str) -> None:
        """Write line (the first only) and close the pipe."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, line.encode("utf-8", "replace") + b"\n")
            os.close(fd)
        except OSError:
            pass  # ollana serve is gone (or gave no pipe): nobody to tell


def start_line(service: Starting, pid: int) -> str | None:
    """What StartReport says of the service now: failed, listening, or nothing yet."""
    if service.failure is not None:
        return "failed " + " ".join(str(service.failure).split())
    address = service.address()
    if address is None:
        return None
    if isinstance(address, UNIXAddress) and address.name is not None:
        where = os.fsdecode(address.name)
    elif isinstance(address, IPv4Address | IPv6Address):
        where = host_port(address.host, address.port)
    else:
        where = str(address)
    return f"ready {pid} {where}"


class StoppingReactor(Protocol):
    """What SecondSignal needs of the reactor besides IReactorFromThreads: IReactorCore's
    triggers and IReactorFDSet's descriptors."""

    def addSystemEventTrigger(
        self,
        phase: str,
        eventType: str,
        callable: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> object: ...

    def getReaders(self) -> list[IReadDescriptor]: ...

    def getWriters(self) -> list[IWriteDescriptor]: ...


class Abortable(Protocol):
    def abortConnection(self) -> None: ...


def _abortable(selectable: object) -> TypeGuard[Abortable]:
    """A connection (TCP, TLS, UNIX), rather than a listening port or a waker."""
    return callable(getattr(selectable, "abortConnection", None))


class SecondSignal:
    """SIGINT or SIGTERM once stopping: the first signal is the reactor's (requests under
    way may finish, up to --drain-timeout); another one, which the reactor would answer with
    a ReactorNotRunning traceback, stops at once: every connection is closed now."""

    def __init__(self, reactor: StoppingReactor) -> None:
        self.reactor = reactor
        self.stopping = False
        self.first: dict[int, Callable[[int, FrameType | None], object]] = {}

    def install(self) -> None:
        """Stand in front of the reactor's handlers of SIGINT and SIGTERM, where it has any."""
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)
        for number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(number)
            if callable(handler):
                self.first[number] = handler
                signal.signal(number, self)

    def _stopping(self) -> None:
        self.stopping = True

    def __call__(self, number: int, frame: FrameType | None) -> None:
        if self.stopping:
            IReactorFromThreads(self.reactor).callFromThread(self.stop_now, number)
        else:
            self.stopping = True
            self.first[number](number, frame)

    def stop_now(self, number: int) -> None:
        """Close every connection, so that the stop need not wait for any."""
        selectables = {*self.reactor.getReaders(), *self.reactor.getWriters()}
        connections = [c for c in selectables if _abortable(c)]
        log.warn("{signal} again: stopping now, closing {count} connection(s)",
                 signal=signal.Signals(number).name, count=len(connections))  # fmt: skip
        for connection in connections:
            connection.abortConnection()


def _exit_if_failed(service: Starting, report: StartReport) -> None:
    """twistd exits 0 whatever happened: make a fatal start-up error exit 1 (and say it to
    ollana serve -d, if the daemon stopped before it could)."""
    if service.failure is not None:
        report.say(start_line(service, os.getpid()) or "")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
