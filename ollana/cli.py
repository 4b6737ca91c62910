"""The ollana command: discover, status, models, ps, serve and demo."""

from __future__ import annotations

import json
import os
import re
import select
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, TextIO

from twisted.internet import defer, error, task
from twisted.internet.error import CannotListenError
from twisted.python import usage

from ollana import DESCRIPTION, config
from ollana.auth import PacketAuth
from ollana.demo import DemoOptions, run_demo
from ollana.discovery import Seeker
from ollana.listings import SERVERS_FIELD
from ollana.logs import LEVELS, LOG_LEVEL_ENV
from ollana.netif import default_broadcast_addresses
from ollana.peers import Peer, PeerPool, Source, host_port
from ollana.tap import (
    OPTION_GROUPS,
    READY_FD_ENV,
    DiscoveryOptions,
    OllanaOptions,
    grouped_usage,
    option_entries,
)

REPEAT_PROBE = 0.5
STATUS_TIMEOUT = 3.0
STATUS_PATH = "/ollana/api/status"
# Where ollana status looks without --url: client mode's port, then server mode's.
STATUS_URLS = ("http://127.0.0.1:11434", "http://127.0.0.1:11435")
JSON_LOGGER = "ollana.logs.json_observer"
TEXT_LOGGER = "ollana.logs.text_observer"  # twistd's lines, with the rotated files capped
LOGFILE_ENV = "OLLANA_LOGFILE"  # where ollana.logs' observers write, if set
START_TIMEOUT = 30.0  # seconds ollana serve -d waits for the daemon to listen
# ollana serve --help: its own options under these headings, with Ollana's.
SERVE_GROUPS = tuple(
    (heading, {"Mode": ("daemon", "pidfile"), "Logging": ("logfile", "log-format", "log-level")}
     .get(heading, ()) + names)
    for heading, names in OPTION_GROUPS
)  # fmt: skip


class DiscoverOptions(DiscoveryOptions):
    synopsis = "[--timeout SECONDS] [--broadcast ADDR]... [--discovery-port N] [--json]"
    longdesc = "Probe the LAN for Ollana servers and list them. Exits 1 when none answered."
    optFlags = [["json", None, "Print JSON instead of a table."]]
    optParameters = [["timeout", "t", "2", "Seconds to wait for answers."]]

    def postOptions(self) -> None:
        super().postOptions()
        self["timeout"] = config.parse_seconds(str(self["timeout"]), "--timeout")


# --- serve ----------------------------------------------------------------------------


def state_dir(env: Mapping[str, str]) -> str:
    """Where a daemon keeps its log (and its pidfile without $XDG_RUNTIME_DIR)."""
    home = env.get("HOME") or os.path.expanduser("~")
    state = env.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(state):  # the XDG spec: relative values are to be ignored
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "ollana")


def default_pidfile(env: Mapping[str, str]) -> str:
    runtime = env.get("XDG_RUNTIME_DIR") or ""
    if os.path.isabs(runtime):
        return os.path.join(runtime, "ollana.pid")
    return os.path.join(state_dir(env), "ollana.pid")


def default_logfile(env: Mapping[str, str]) -> str:
    return os.path.join(state_dir(env), "ollana.log")


def _path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class TwistdCommand:
    """How ollana serve runs twistd: its arguments, where the pidfile and the log go (None:
    no pidfile; standard output) and the environment variables to set (None: unset)."""

    argv: list[str]
    pidfile: str | None
    logfile: str | None
    env: dict[str, str | None]


def twistd_command(
    daemon: bool,
    pidfile: str | None,
    logfile: str | None,
    log_format: str,
    plugin_args: Sequence[str],
    env: Mapping[str, str],
    log_level: str | None = None,
) -> TwistdCommand:
    """twistd's arguments for ollana serve: in the foreground, no pidfile and the log on
    standard output unless given; with daemon, a pidfile and a log file, in the default
    places unless given. The plugin's arguments follow ``ollana`` unchanged; relative
    paths become absolute. The log is written by an observer of ollana.logs (rotated
    files capped, no debug lines unless log_level says so), to the file that
    $OLLANA_LOGFILE names, at $OLLANA_LOG_LEVEL, since twistd's --logger takes no
    arguments (and its --logfile keeps every rotated file)."""
    pid: str | None = _path(pidfile) if pidfile else None
    log: str | None = _path(logfile) if logfile and logfile != "-" else None
    if daemon:
        pid = pid or _path(default_pidfile(env))
        log = log or _path(default_logfile(env))
        args = ["--pidfile=" + pid]
    else:
        args = ["-n", "--pidfile=" + (pid or "")]
    args.append("--logger=" + (JSON_LOGGER if log_format == "json" else TEXT_LOGGER))
    variables: dict[str, str | None] = {LOGFILE_ENV: log}
    if log_level is not None:
        variables[LOG_LEVEL_ENV] = log_level
    return TwistdCommand([*args, "ollana", *plugin_args], pid, log, variables)


def split_serve_args(
    argv: Sequence[str], own: Sequence[str], plugin: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Split ollana serve's arguments into its own and the plugin's, both unchanged.

    own and plugin are getopt long options (``name`` or ``name=``). Long options may be
    abbreviated, as twistd allows; ``-d`` is serve's; everything after ``--`` is the
    plugin's.
    """
    names = [*own, *(option for option in plugin if option.rstrip("=") not in ("help",))]
    mine = {option.rstrip("=") for option in own}
    serve: list[str] = []
    passed: list[str] = []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--":
            passed += tokens
            break
        if token == "-d":
            serve.append(token)
        elif token.startswith("--"):
            name, has_value, _ = token[2:].partition("=")
            takes_value, full = _long_option(name, names)
            target = serve if full in mine else passed
            target.append(token)
            if takes_value and not has_value and tokens:
                target.append(tokens.pop(0))
        elif token.startswith("-") and token != "-":
            passed.append(token)  # a short option: twistd ollana has none, and will say so
        else:
            raise usage.UsageError(f"unexpected argument {token!r}: options start with --")
    return serve, passed


def _long_option(name: str, names: Sequence[str]) -> tuple[bool, str]:
    """Whether the long option name (perhaps abbreviated) takes a value, and its full name."""
    exact = [option for option in names if option.rstrip("=") == name]
    matches = exact or [option for option in names if option.startswith(name)]
    if not matches:
        raise usage.UsageError(f"option --{name} not recognized")
    if len(matches) > 1:
        raise usage.UsageError(f"option --{name} not a unique prefix")
    return matches[0].endswith("="), matches[0].rstrip("=")


class ServeOptions(OllanaOptions):
    synopsis = (
        "[-d] [--pidfile PATH] [--logfile PATH] [--log-format text|json] [--log-level LEVEL] "
        "[options...]"
    )
    longdesc = (
        "Run Ollana (twistd ollana): in the foreground, logging to standard output, or with "
        "-d in the background, with a pidfile and a log file; -d returns once Ollana "
        "listens, or says why it could not start. Options other than -d, --pidfile and "
        "--log* are Ollana's own and go to twistd ollana unchanged; so does everything "
        "after --."
    )
    optFlags = [["daemon", "d", "Run in the background."]]
    optParameters = [
        [
            "pidfile",
            None,
            None,
            "Where the process id goes [default: none in the foreground; with -d, "
            "$XDG_RUNTIME_DIR/ollana.pid, else ~/.local/state/ollana/ollana.pid].",
        ],
        [
            "logfile",
            None,
            None,
            "Where the log goes [default: standard output in the foreground; with -d, "
            "~/.local/state/ollana/ollana.log].",
        ],
        [
            "log-format",
            None,
            "text",
            "text, or json for one JSON object per line.",
        ],
        [
            "log-level",
            None,
            None,
            "The least a line must be to be logged: debug, info, warn, error or critical "
            "[default: $OLLANA_LOG_LEVEL, else info].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.plugin_args: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        from ollana.tap import Options

        argv = sys.argv[1:] if options is None else options
        own = ["daemon", "pidfile=", "logfile=", "log-format=", "log-level=", "help"]
        mine, self.plugin_args = split_serve_args(argv, own, Options().longOpt)
        super().parseOptions(mine)

    def postOptions(self) -> None:
        from ollana.tap import Options

        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(
                f"--log-format: must be text or json, not {self['log-format']!r}"
            )
        level = self["log-level"]
        if level is not None and level.strip().lower() not in LEVELS:
            raise usage.UsageError(
                f"--log-level: must be one of {', '.join(LEVELS)}, not {level!r}"
            )
        if level is not None:
            self["log-level"] = level.strip().lower()
        if self["daemon"] and self["logfile"] == "-":
            raise usage.UsageError("--logfile: with -d the log cannot go to standard output")
        for name in ("pidfile", "logfile"):
            if self[name] is not None and not self[name] and (self["daemon"] or name == "logfile"):
                raise usage.UsageError(f"--{name}: give a path")
        Options().parseOptions(self.plugin_args)  # bad values stop us here, in one line

    def getUsage(self, width: int | None = None) -> str:
        """Its options and Ollana's, under the same headings."""
        from ollana.tap import Options

        width = width or int(os.environ.get("COLUMNS", "80"))
        entries = {**option_entries(Options()), **option_entries(self)}
        longdesc = "\n".join(textwrap.wrap(self.longdesc, width))
        return grouped_usage(entries, SERVE_GROUPS, width) + "\n" + longdesc + "\n"

    def command(self, env: Mapping[str, str] | None = None) -> TwistdCommand:
        """How to run twistd."""
        return twistd_command(
            self["daemon"],
            self["pidfile"],
            self["logfile"],
            self["log-format"],
            self.plugin_args,
            os.environ if env is None else env,
            self["log-level"],
        )


def _twistd_options() -> Any:
    """twistd's options, knowing the ollana plugin even where twistd would not find it
    (an editable install), and no other plugin."""
    from twisted.application.service import ServiceMaker
    from twisted.scripts.twistd import ServerOptions

    maker: Any = ServiceMaker("ollana", "ollana.tap", DESCRIPTION, "ollana")

    options = ServerOptions()
    options._getPlugins = lambda interface, package=None: [maker]
    return options


def running_pid(pidfile: str) -> int | None:
    """The process id in pidfile, if that process still runs."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def serve(options: ServeOptions) -> NoReturn:
    """Run twistd ollana in this process; never returns."""
    from twisted.python.reflect import namedAny
    from twisted.scripts.twistd import runApp

    command = options.command()
    for path in (command.pidfile, command.logfile):
        if path:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as e:
                _fail(f"cannot create the directory for {path}: {e.strerror}", 1)
    if command.pidfile:
        pid = running_pid(command.pidfile)
        if pid is not None:
            _fail(
                f"Ollana already runs as process {pid} (pidfile {tilde(command.pidfile)}); "
                "stop it first",
                1,
            )
    for name, value in command.env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    logger = JSON_LOGGER if options["log-format"] == "json" else TEXT_LOGGER
    try:
        namedAny(logger)
    except Exception as e:
        _fail(f"--log-format {options['log-format']}: cannot load {logger}: {e}", 2)
    twistd = _twistd_options()
    try:
        twistd.parseOptions(command.argv)
    except usage.UsageError as e:
        _fail(str(e), 2)
    sys.stdout.flush()
    sys.stderr.flush()
    if options["daemon"]:
        # This process waits for the daemon's word, which its child (twistd, which
        # daemonizes) gives on a pipe once it listens or has failed.
        read, write = os.pipe()
        if os.fork():
            os.close(write)
            try:
                line = await_line(read, START_TIMEOUT)
            except KeyboardInterrupt:
                log = tilde(command.logfile)
                _fail(f"stopped waiting; Ollana may still start (log {log})", 130)
            code, message = started(line, command, START_TIMEOUT)
            (sys.stdout if code == 0 else sys.stderr).write(message + "\n")
            raise SystemExit(code)
        os.close(read)
        os.environ[READY_FD_ENV] = str(write)
    runApp(twistd)
    raise SystemExit(0)


def await_line(fd: int, timeout: float) -> str | None:
    """The first line read from fd: "" if it closed first, None if none came in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace")


def started(line: str | None, command: TwistdCommand, timeout: float) -> tuple[int, str]:
    """ollana serve -d's exit status and line, from what the daemon said (StartReport)."""
    pidfile, log = tilde(command.pidfile), tilde(command.logfile)
    word, _, rest = (line or "").partition(" ")
    if word == "ready":
        pid, _, address = rest.partition(" ")
        return 0, (f"Ollana listens on {address}, in the background as process {pid} "
                   f"(pidfile {pidfile}, log {log})")  # fmt: skip
    if word == "failed" and rest:
        return 1, f"ollana: {rest}"
    if line is None:
        return 1, f"ollana: Ollana does not listen after {timeout:g} s; see its log {log}"
    reason = last_problem(command.logfile) if command.logfile else None
    return 1, f"ollana: Ollana stopped as it started: {reason or 'see its log ' + log}"


def last_problem(logfile: str) -> str | None:
    """The message of the last error (or critical) line of a log, text or JSON."""
    try:
        with open(logfile, "rb") as f:
            f.seek(max(0, os.path.getsize(logfile) - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("level") in ("error", "critical"):
                return str(event.get("message", "")).strip() or None
        elif "#error] " in line or "#critical] " in line:
            return line.split("] ", 1)[1].strip() or None
    return None


def tilde(path: str | None, env: Mapping[str, str] | None = None) -> str:
    """A path as people write it: ~/... under the home directory."""
    home = (os.environ if env is None else env).get("HOME") or os.path.expanduser("~")
    if path and home not in ("", "/") and path.startswith(home.rstrip("/") + "/"):
        return "~/" + path[len(home.rstrip("/")) + 1 :]
    return path or "-"


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"ollana: {message}\n")
    raise SystemExit(code)


# --- status ---------------------------------------------------------------------------


class StatusOptions(OllanaOptions):
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

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self["timeout"] = config.parse_seconds(str(self["timeout"]), "--timeout")
        if self["url"] is None:
            host = self.environ.get("OLLAMA_HOST", "").strip()
            first = [config.parse_ollama_url(host, "OLLAMA_HOST")] if host else []
            self["urls"] = list(dict.fromkeys([*first, *STATUS_URLS]))
        else:
            self["urls"] = [config.parse_ollama_url(self["url"], "--url")]


class StatusError(Exception):
    """Why an address gave no status."""


async def fetch_status(reactor: Any, base: str, timeout: float) -> tuple[Any, str]:
    """The status of the Ollana at base, and its JSON text; StatusError saying why not."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, False))
    http = HTTPClient(agent)

    async def get() -> tuple[int, bytes]:
        response = await http.get(
            base + STATUS_PATH, headers=Headers({b"accept": [b"application/json"]})
        )
        return response.code, await response.content()

    try:
        code, body = await defer.Deferred.fromCoroutine(get()).addTimeout(timeout, reactor)
    except error.ConnectionRefusedError:
        raise StatusError("connection refused") from None
    except (defer.TimeoutError, defer.CancelledError, error.TimeoutError):
        raise StatusError(f"no answer within {timeout:g} s") from None
    except error.DNSLookupError:
        raise StatusError("unknown host") from None
    except Exception as e:  # any other connection failure, in one line
        raise StatusError(_one_line(e)) from None
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


def _one_line(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)  # twisted.web's ResponseNeverReceived and friends
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [list(header), *[list(row) for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_status(status: Mapping[str, Any], url: str) -> str:
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
            lines.append(_table(
                ("SERVER", "SOURCE", "HEALTH", "LATENCY", "ACTIVE/TOTAL", "FAILURES", "MODELS"),
                [_peer_row(peer) for peer in peers],
            ))  # fmt: skip
            if any(isinstance(p.get("state"), Mapping) for p in peers):  # servers' own load
                lines += ["", _table(
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


def _peer_row(peer: Mapping[str, Any]) -> list[str]:
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


def _load_row(peer: Mapping[str, Any]) -> list[str]:
    load = peer.get("state")
    where = host_port(peer.get("address", "?"), peer.get("port", "?"))
    if not isinstance(load, Mapping):
        return [where, "-", "-", "-"]
    busy_free = f"{load.get('slots_busy', '?')}/{load.get('slots_free', '?')}"
    return [where, _loaded(load), busy_free, str(load.get("queue", "?"))]


def _loaded(load: Mapping[str, Any]) -> str:
    return ", ".join(map(str, load.get("loaded") or [])) or "none"


def _slots(load: Mapping[str, Any]) -> str:
    return f"{load.get('slots_busy', '?')} busy, {load.get('slots_free', '?')} free"


async def status(
    reactor: Any, options: StatusOptions, out: TextIO, err: TextIO = sys.stderr
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


# --- models, ps -----------------------------------------------------------------------


LISTING_URL = "http://127.0.0.1:11434"  # where models and ps ask without --url or $OLLAMA_HOST
LISTING_TIMEOUT = 15.0  # a client asks every server, which may take its listing timeout


class ListingOptions(OllanaOptions):
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

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self["timeout"] = config.parse_seconds(str(self["timeout"]), "--timeout")
        if self["url"] is not None:
            self["base"] = config.parse_ollama_url(self["url"], "--url")
        elif self.environ.get("OLLAMA_HOST", "").strip():
            self["base"] = config.parse_ollama_url(self.environ["OLLAMA_HOST"], "OLLAMA_HOST")
        else:
            self["base"] = LISTING_URL


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


def human_bytes(value: Any) -> str:
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


def parse_time(text: Any) -> float | None:
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


def _servers(entry: Mapping[str, Any]) -> str:
    servers = entry.get(SERVERS_FIELD)
    return ", ".join(map(str, servers)) if isinstance(servers, list) and servers else "-"


def format_models(entries: Sequence[Mapping[str, Any]], now: float) -> str:
    """ollana models's table: ollama list's columns, and the servers that have each model."""
    rows = [
        [str(entry.get("name", "?")), str(entry.get("digest") or "")[:12] or "-",
         human_bytes(entry.get("size")), human_time(parse_time(entry.get("modified_at")), now),
         _servers(entry)]
        for entry in entries
    ]  # fmt: skip
    return _table(("NAME", "ID", "SIZE", "MODIFIED", "SERVERS"), rows)


def processor(entry: Mapping[str, Any]) -> str:
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


def format_ps(entries: Sequence[Mapping[str, Any]], now: float) -> str:
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
    return _table(header, rows)


async def fetch_listing(reactor: Any, url: str, timeout: float) -> tuple[Any, str]:
    """The JSON answer to GET url, and its text; StatusError saying why there is none."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, False))
    http = HTTPClient(agent)

    async def get() -> tuple[int, bytes]:
        response = await http.get(url)
        return response.code, await response.content()

    try:
        code, body = await defer.Deferred.fromCoroutine(get()).addTimeout(timeout, reactor)
    except error.ConnectionRefusedError:
        raise StatusError("connection refused") from None
    except (defer.TimeoutError, defer.CancelledError, error.TimeoutError):
        raise StatusError(f"no answer within {timeout:g} s") from None
    except Exception as e:  # any other connection failure, in one line
        raise StatusError(_one_line(e)) from None
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
    reactor: Any, options: ListingOptions, out: TextIO, err: TextIO = sys.stderr
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


# --- demo -----------------------------------------------------------------------------


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
        ["discover", None, DiscoverOptions, "List the Ollana servers on the LAN."],
        ["status", None, StatusOptions, "Show what the Ollana on this machine is doing."],
        ["serve", None, ServeOptions, "Run Ollana (twistd ollana), in the foreground or -d."],
        ["demo", None, DemoOptions, "Try Ollana on this machine alone, with a fake Ollama."],
        ["version", None, VersionOptions, "Print Ollana's version."],
        ["models", None, ModelsOptions, "List every server's models (alias: list)."],
        ["list", None, ModelsOptions, "The same as models."],
        ["ps", None, PsOptions, "List the models loaded on every server."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "give a command: discover, status, models, ps, serve, demo or version"
            )


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
    return _table(
        header,
        [
            (
                r["address"],
                str(r["port"]),
                r["scheme"],
                r["node_id"] or "-",
                "legacy Ollana" if r["legacy"] else r["version"],
            )
            for r in rows
        ],
    )


async def discover(
    reactor: Any, options: DiscoverOptions, out: TextIO, err: TextIO = sys.stderr
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


def main(argv: list[str] | None = None) -> None:
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        if options.subCommand is None and not getattr(options, "subOptions", None):
            sys.stderr.write(f"{options}\n")
        _fail(str(e), 2)
    command, sub = options.subCommand, options.subOptions
    if command == "serve":
        serve(sub)
    if command == "demo":
        raise SystemExit(run_demo(sub))

    async def run(reactor: Any) -> None:
        try:
            if command == "status":
                code = await status(reactor, sub, sys.stdout)
            elif command in ("models", "list", "ps"):
                code = await listing(reactor, sub, sys.stdout)
            else:
                code = await discover(reactor, sub, sys.stdout)
        except CannotListenError as e:
            sys.stderr.write(f"ollana: cannot open a UDP socket: {e.socketError}\n")
            code = 2
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
