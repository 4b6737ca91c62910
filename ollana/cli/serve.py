"""ollana serve: run twistd ollana in this process, in the foreground or with -d as a
daemon that says once it listens (or why it could not start); where its pidfile and log
go, and which of its arguments are serve's own and which twistd ollana's."""

from __future__ import annotations

import json
import os
import select
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from twisted.python import usage
from twisted.python.reflect import namedAny
from twisted.scripts.twistd import ServerOptions, runApp

from ollana.cli.common import fail
from ollana.logs import LEVELS, LOG_LEVEL_ENV
from ollana.tap import (
    OPTION_GROUPS,
    READY_FD_ENV,
    OllanaOptions,
    grouped_usage,
    option_entries,
)
from ollana.tap import Options as PluginOptions
from twisted.plugins.ollana_plugin import ollana as plugin

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
        argv = sys.argv[1:] if options is None else options
        own = ["daemon", "pidfile=", "logfile=", "log-format=", "log-level=", "help"]
        mine, self.plugin_args = split_serve_args(argv, own, PluginOptions().longOpt)
        super().parseOptions(mine)

    def postOptions(self) -> None:
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
        PluginOptions().parseOptions(self.plugin_args)  # bad values stop us here, in one line

    def getUsage(self, width: int | None = None) -> str:
        """Its options and Ollana's, under the same headings."""
        width = width or int(os.environ.get("COLUMNS", "80"))
        entries = {**option_entries(PluginOptions()), **option_entries(self)}
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


class TwistdOptions(ServerOptions):
    """twistd's options with Ollana's plugin as their only command, so that ollana serve
    runs it even where twistd would not find it (an editable install)."""

    subCommands = [[plugin.tapname, None, plugin.options, plugin.description]]

    def __init__(self) -> None:
        super().__init__()
        # Where twistd's ApplicationRunner looks up the maker of the command given.
        self.loadedPlugins = {plugin.tapname: plugin}


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
    command = options.command()
    for path in (command.pidfile, command.logfile):
        if path:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as e:
                fail(f"cannot create the directory for {path}: {e.strerror}", 1)
    if command.pidfile:
        pid = running_pid(command.pidfile)
        if pid is not None:
            fail(
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
        fail(f"--log-format {options['log-format']}: cannot load {logger}: {e}", 2)
    twistd = TwistdOptions()
    try:
        twistd.parseOptions(command.argv)
    except usage.UsageError as e:
        fail(str(e), 2)
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
                fail(f"stopped waiting; Ollana may still start (log {log})", 130)
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
