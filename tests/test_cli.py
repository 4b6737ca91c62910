"""The ollana command: discover on a fake network; serve, status and demo for real, on
loopback only (servers with --no-discovery, the demo's broadcasts to 127.255.255.255)."""

from __future__ import annotations

import configparser
import errno
import importlib
import io
import json
import os
import re
import signal
import socket
import sys
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.application.service import IServiceMaker
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.server import Site

import ollana.cli.status
from ollana import __version__, wire
from ollana.cli import main
from ollana.cli.discover import DiscoverOptions, discover
from ollana.cli.serve import (
    ServeOptions,
    TwistdCommand,
    TwistdOptions,
    await_line,
    split_serve_args,
    started,
    tilde,
)
from ollana.cli.status import STATUS_URLS, StatusOptions, format_duration, format_status, status
from ollana.tap import Options, makeService
from tests.support.fake_ollama import ECHO_MODEL, FakeOllama
from tests.support.fakes import FakeNetworkReactor
from tests.support.processes import (
    REPO,
    ChildProcess,
    accepted_connections_closed,
    eventually,
    free_tcp_port,
    kill_quietly,
    process_alive,
    python_env,
    read_text,
)

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"
SERVER = ["--mode", "server", "--no-discovery", "--listen", LOOPBACK]

A = bytes.fromhex("aa" * 16)
B = bytes.fromhex("bb" * 16)


class DiscoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeNetworkReactor()
        self.out = io.StringIO()

    def run_discover(self, *args: str, answer: bool = True) -> tuple[int, str]:
        options = DiscoverOptions()
        options.parseOptions(["--broadcast", "127.255.255.255", "--discovery-port", "12000", *args])
        d = defer.Deferred.fromCoroutine(discover(self.reactor, options, self.out))
        [port] = self.reactor.udp_ports
        self.assertTrue(port.broadcast_allowed)
        [(probe, target)] = port.take()
        self.assertIsInstance(wire.decode(probe), wire.Probe)
        self.assertEqual(target, ("127.255.255.255", 12000))
        if answer:
            reply = wire.Announce(A, 11435, "http", "0.1.0")
            port.protocol.datagramReceived(wire.encode(reply), ("198.18.0.2", 12000))
            self.reactor.advance(0.5)
            self.assertEqual(len(port.take()), 1, "probes again while waiting")
            port.protocol.datagramReceived(
                wire.encode(wire.Announce(B, 8443, "https", "0.2.0")), ("198.18.0.10", 12000)
            )
            port.protocol.datagramReceived(b"LANA", ("198.18.0.3", 12000))
            port.protocol.datagramReceived(wire.encode(reply), ("198.18.0.2", 12000))
        else:
            self.reactor.advance(0.5)
        self.reactor.advance(1.4)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        code = self.successResultOf(d)
        self.assertFalse(port.listening)
        return code, self.out.getvalue()

    def test_table(self) -> None:
        code, text = self.run_discover()
        self.assertEqual(code, 0)
        self.assertEqual(
            text.splitlines(),
            [
                "ADDRESS      PORT   SCHEME  NODE                              VERSION",
                "198.18.0.10  8443   https   " + B.hex() + "  0.2.0",
                "198.18.0.2   11435  http    " + A.hex() + "  0.1.0",
                "198.18.0.3   11435  http    -                                 legacy Ollana",
            ],
        )

    def test_json(self) -> None:
        code, text = self.run_discover("--json")
        self.assertEqual(code, 0)
        self.assertEqual(
            json.loads(text),
            [
                {
                    "address": "198.18.0.10",
                    "port": 8443,
                    "scheme": "https",
                    "node_id": B.hex(),
                    "version": "0.2.0",
                    "legacy": False,
                },
                {
                    "address": "198.18.0.2",
                    "port": 11435,
                    "scheme": "http",
                    "node_id": A.hex(),
                    "version": "0.1.0",
                    "legacy": False,
                },
                {
                    "address": "198.18.0.3",
                    "port": 11435,
                    "scheme": "http",
                    "node_id": None,
                    "version": None,
                    "legacy": True,
                },
            ],
        )

    def test_nothing_found_exits_1(self) -> None:
        code, text = self.run_discover(answer=False)
        self.assertEqual((code, text), (1, "No Ollana server answered within 2 s.\n"))

    def test_nothing_found_json_is_an_empty_list(self) -> None:
        code, text = self.run_discover("--json", answer=False)
        self.assertEqual((code, json.loads(text)), (1, []))


class SendFailureTests(SynchronousTestCase):
    def test_says_when_no_probe_could_be_sent(self) -> None:
        reactor = FakeNetworkReactor()
        reactor.udp_write_error = OSError(errno.ENETUNREACH, "Network is unreachable")
        options = DiscoverOptions()
        options.parseOptions(["--broadcast", "255.255.255.255", "--discovery-port", "12000"])
        out, err = io.StringIO(), io.StringIO()
        d = defer.Deferred.fromCoroutine(discover(reactor, options, out, err))
        reactor.advance(2)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(
            err.getvalue(),
            "ollana: could not send any probe "
            "(last error: 255.255.255.255:12000: Network is unreachable)\n",
        )
        self.assertEqual(out.getvalue(), "No Ollana server answered within 2 s.\n")


class UsageTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str]:
        import sys

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, main, list(argv))
        return e.code, err.getvalue()

    def test_bad_timeout(self) -> None:
        code, err = self.run_main("discover", "--timeout", "soon")
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines()[-1], "ollana: --timeout: not a number of seconds: 'soon'")

    def test_no_command(self) -> None:
        code, err = self.run_main()
        self.assertEqual(code, 2)
        self.assertIn("Usage: ollana COMMAND", err)
        self.assertEqual(
            err.splitlines()[-1],
            "ollana: give a command: discover, status, models, ps, serve, demo or version",
        )

    def test_unknown_command(self) -> None:
        code, err = self.run_main("conquer")
        self.assertEqual(code, 2)
        self.assertIn("conquer", err.splitlines()[-1])

    def test_bad_input_is_one_line(self) -> None:
        cases = [
            (["serve", "--log-format", "xml"],
             "ollana: --log-format: must be text or json, not 'xml'"),
            (["serve", "--mode", "bogus"],
             "ollana: --mode: must be auto, server or client, not 'bogus'"),
            (["serve", "--nope"], "ollana: option --nope not recognized"),
            (["serve", "--mod", "server"], "ollana: option --mod not a unique prefix"),
            (["serve", "-d", "--logfile", "-"],
             "ollana: --logfile: with -d the log cannot go to standard output"),
            (["serve", "-d", "--pidfile="], "ollana: --pidfile: give a path"),
            (["serve", "stray"], "ollana: unexpected argument 'stray': options start with --"),
            (["serve", "-x"], "ollana: option -x not recognized"),
            (["serve", "--log-level", "loud"],
             "ollana: --log-level: must be one of debug, info, warn, error, critical, not 'loud'"),
            (["serve", "--ollama", "not a url"],
             "ollana: --ollama: not an http(s) URL or HOST:PORT: 'not a url'"),
            (["serve", "--no-discovery"],
             "ollana: --no-discovery in auto mode needs at least one --peer (or --mode server)"),
            (["status", "--url", "ftp://x"],
             "ollana: --url: scheme must be http or https, not 'ftp'"),
            (["status", "--timeout", "0"],
             "ollana: --timeout: must be between 0.1 and 86400 seconds, not 0"),
            (["demo", "--port", "70000"], "ollana: --port: port must be 1-65535, not 70000"),
            (["demo", "--pace", "fast"], "ollana: --pace: must be 0 to 10 seconds, not 'fast'"),
        ]  # fmt: skip
        for argv, line in cases:
            code, err = self.run_main(*argv)
            self.assertEqual((code, err), (2, line + "\n"), argv)


class VersionTests(SynchronousTestCase):
    """Ollana's version, not Twisted's, however asked."""

    def run_main(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, main, list(argv))
        return e.code, out.getvalue()

    def test_ollana_version(self) -> None:
        for argv in (["--version"], ["version"], ["serve", "--version"], ["status", "--version"],
                     ["discover", "--version"], ["demo", "--version"]):  # fmt: skip
            self.assertEqual(self.run_main(*argv), (0, f"ollana {__version__}\n"), argv)

    def test_twistd_ollana_version(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        twistd = TwistdOptions()
        e = self.assertRaises(SystemExit, twistd.parseOptions, ["ollana", "--version"])
        self.assertEqual((e.code, out.getvalue()), (0, f"ollana {__version__}\n"))

    def test_twistd_ollana_help_has_the_headings(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        twistd = TwistdOptions()
        self.assertRaises(SystemExit, twistd.parseOptions, ["ollana", "--help"])
        self.assertTrue(out.getvalue().startswith("Usage: twistd [options] ollana [options]\n"))
        self.assertIn("\nSecurity:\n      --secret-file=", out.getvalue())


class PackagingTests(SynchronousTestCase):
    def test_every_package_is_installed(self) -> None:
        """setup.cfg names each package (ollana.cli among them): the console script, which
        imports ollana.cli, would break in a non-editable install without it."""
        setup = configparser.ConfigParser()
        setup.read(REPO / "setup.cfg")
        listed = setup["options"]["packages"].split()
        found = [
            ".".join(init.parent.relative_to(REPO).parts)
            for init in sorted((REPO / "ollana").rglob("__init__.py"))
        ]
        self.assertIn("ollana.cli", found)
        self.assertEqual(sorted(set(found) - set(listed)), [])


class TwistdOptionsTests(SynchronousTestCase):
    """ollana serve's twistd knows Ollana's plugin, the one twistd finds, and no other."""

    def test_ollana_is_the_only_command(self) -> None:
        self.assertEqual([command[0] for command in TwistdOptions().subCommands], ["ollana"])
        self.assertRaises(UsageError, TwistdOptions().parseOptions, ["web"])

    def test_twistd_makes_the_service_with_the_plugins_maker(self) -> None:
        plugin = importlib.import_module("twisted.plugins.ollana_plugin")
        [maker] = [value for value in vars(plugin).values() if IServiceMaker.providedBy(value)]
        twistd = TwistdOptions()
        twistd.parseOptions(["-n", "--pidfile=", "ollana", *SERVER])
        # What twistd's ApplicationRunner makes the service with:
        self.assertIs(twistd.loadedPlugins[twistd.subCommand], maker)
        self.assertIs(maker.makeService, makeService)
        self.assertIsInstance(twistd.subOptions, Options)
        self.assertEqual(twistd.subOptions["mode"], "server")


ENV = {"HOME": "/home/ann", "XDG_RUNTIME_DIR": "/run/user/1000"}


def command(*argv: str, env: dict[str, str] = ENV) -> TwistdCommand:
    options = ServeOptions()
    options.parseOptions(list(argv))
    return options.command(env)


class ServeArgumentTests(SynchronousTestCase):
    """What ollana serve gives twistd; nothing runs."""

    def test_foreground_by_default(self) -> None:
        c = command("--mode", "server", "--broadcast", "127.255.255.255")
        self.assertEqual(
            c.argv, ["-n", "--pidfile=", "--logger=ollana.logs.text_observer", "ollana",
                     "--mode", "server", "--broadcast", "127.255.255.255"],
        )  # fmt: skip
        self.assertEqual((c.pidfile, c.logfile, c.env), (None, None, {"OLLANA_LOGFILE": None}))

    def test_foreground_with_pidfile_and_logfile(self) -> None:
        c = command("--pidfile", "run/o.pid", "--logfile=/var/log/o.log")
        pidfile = os.path.abspath("run/o.pid")
        self.assertEqual(
            c.argv, ["-n", "--pidfile=" + pidfile, "--logger=ollana.logs.text_observer", "ollana"]
        )
        self.assertEqual((c.pidfile, c.logfile), (pidfile, "/var/log/o.log"))
        self.assertEqual(c.env, {"OLLANA_LOGFILE": "/var/log/o.log"})
        self.assertEqual(command("--logfile", "-").env, {"OLLANA_LOGFILE": None})

    def test_daemon_defaults(self) -> None:
        c = command("-d")
        self.assertEqual(
            c.argv,
            ["--pidfile=/run/user/1000/ollana.pid", "--logger=ollana.logs.text_observer",
             "ollana"],
        )  # fmt: skip
        self.assertEqual(c.env, {"OLLANA_LOGFILE": "/home/ann/.local/state/ollana/ollana.log"})
        c = command("--daemon", env={"HOME": "/home/ann"})
        self.assertEqual(c.pidfile, "/home/ann/.local/state/ollana/ollana.pid")
        c = command("-d", env={"HOME": "/home/ann", "XDG_STATE_HOME": "/srv/state"})
        self.assertEqual(
            (c.pidfile, c.logfile), ("/srv/state/ollana/ollana.pid", "/srv/state/ollana/ollana.log")
        )
        c = command("-d", env={"HOME": "/home/ann", "XDG_RUNTIME_DIR": "relative"})
        self.assertEqual(c.pidfile, "/home/ann/.local/state/ollana/ollana.pid")

    def test_daemon_with_paths(self) -> None:
        c = command("-d", "--pidfile", "/tmp/o.pid", "--logfile", "/tmp/o.log", "--mode", "client")
        self.assertEqual(
            c.argv,
            ["--pidfile=/tmp/o.pid", "--logger=ollana.logs.text_observer", "ollana", "--mode",
             "client"],
        )  # fmt: skip
        self.assertEqual(c.env, {"OLLANA_LOGFILE": "/tmp/o.log"})

    def test_json_logs(self) -> None:
        c = command("--log-format", "json")
        self.assertEqual(
            c.argv, ["-n", "--pidfile=", "--logger=ollana.logs.json_observer", "ollana"]
        )
        self.assertEqual(c.env, {"OLLANA_LOGFILE": None}, "standard output")
        c = command("-d", "--log-format=json")
        self.assertEqual(
            c.argv,
            ["--pidfile=/run/user/1000/ollana.pid", "--logger=ollana.logs.json_observer", "ollana"],
        )
        self.assertEqual(c.env, {"OLLANA_LOGFILE": "/home/ann/.local/state/ollana/ollana.log"})
        c = command("--log-format", "json", "--logfile", "/tmp/o.jsonl")
        self.assertEqual(c.env, {"OLLANA_LOGFILE": "/tmp/o.jsonl"})

    def test_log_level(self) -> None:
        c = command("--log-level", "DEBUG", "--mode", "server")
        self.assertEqual(c.env, {"OLLANA_LOGFILE": None, "OLLANA_LOG_LEVEL": "debug"})
        self.assertEqual(c.argv[-3:], ["ollana", "--mode", "server"], "serve's own option")
        self.assertNotIn("OLLANA_LOG_LEVEL", command("-d").env, "$OLLANA_LOG_LEVEL is kept")

    def test_plugin_options_pass_through_unchanged(self) -> None:
        argv = [
            "--mode", "client", "-d", "--peer", "198.18.0.2:11435", "--pid=/tmp/o.pid",
            "--broad", "127.255.255.255", "--no-discovery", "--log-format", "text",
            "--", "--listen", "tcp:0:interface=127.0.0.1",
        ]  # fmt: skip
        c = command(*argv)
        self.assertEqual(
            c.argv,
            ["--pidfile=/tmp/o.pid", "--logger=ollana.logs.text_observer",
             "ollana", "--mode", "client", "--peer", "198.18.0.2:11435", "--broad",
             "127.255.255.255", "--no-discovery", "--listen", "tcp:0:interface=127.0.0.1"],
        )  # fmt: skip

    def test_split(self) -> None:
        own = ["daemon", "pidfile=", "logfile=", "log-format=", "log-level=", "help"]
        plugin = Options().longOpt
        self.assertEqual(
            split_serve_args(["--ollama", "-d", "--logf", "l", "-d"], own, plugin),
            (["--logf", "l", "-d"], ["--ollama", "-d"]),
            "an option's value is the option's, even when it looks like -d",
        )
        self.assertEqual(
            split_serve_args(["--", "-d", "--help"], own, plugin), ([], ["-d", "--help"])
        )

    def test_tilde(self) -> None:
        env = {"HOME": "/home/ann/"}
        self.assertEqual(tilde("/home/ann/.local/x", env), "~/.local/x")
        self.assertEqual(tilde("/home/annex/x", env), "/home/annex/x")
        self.assertEqual(tilde(None, env), "-")

    def test_help_lists_both_under_headings(self) -> None:
        text = ServeOptions().getUsage(width=100)
        headings = [line for line in text.splitlines() if line.endswith(":") and line[0] != " "]
        self.assertEqual(
            headings,
            ["Mode:", "Discovery:", "Routing:", "Security:", "Limits:", "Logging:", "Other:"],
        )
        mode = text.split("Mode:\n", 1)[1].split("\n\nDiscovery:", 1)[0]
        self.assertEqual(
            re.findall(r"--([\w-]+)", mode)[:4], ["daemon", "pidfile", "mode", "ollama"]
        )
        logging = text.split("Logging:\n", 1)[1].split("\n\nOther:", 1)[0]
        self.assertEqual(
            re.findall(r"^ {2}(?:-\w,| {3}) --([\w-]+)", logging, flags=re.M),
            ["logfile", "log-format", "log-level"],
        )
        listed = re.findall(r"^ {2}(?:-\w,| {3}) --([\w-]+)", text, flags=re.M)
        own = ["daemon", "pidfile", "logfile", "log-format", "log-level"]
        everything = {*own, *(o.rstrip("=") for o in Options().longOpt)}
        self.assertEqual(sorted(listed), sorted(everything), "each option once")


class StatusFormatTests(SynchronousTestCase):
    def test_durations(self) -> None:
        self.assertEqual(
            [format_duration(s) for s in (0, 59.4, 61, 3600 * 2 + 65, 86400 * 3 + 7200)],
            ["0 s", "59 s", "1 min 01 s", "2 h 01 min", "3 d 2 h"],
        )

    def test_client(self) -> None:
        peer = {
            "address": "fd00::2", "port": 11435, "source": "static", "healthy": False,
            "reason": "connection refused", "latency_ms": None, "active_requests": 0,
            "total_requests": 12, "failures": 3, "models": [],
        }  # fmt: skip
        load = {"parallel": 2, "max_queue": 512, "max_loaded": 3, "loaded": ["echo:latest"],
                "models": {"echo:latest": {"in_flight": 3, "waiting": 1}}, "slots_busy": 2,
                "slots_free": 0, "queue": 1}  # fmt: skip
        good = dict(peer, address="198.18.0.2", source="discovered", healthy=True, reason="",
                    latency_ms=3.25, active_requests=1, failures=0,
                    models=["echo:latest", "llama3.2:latest"], state=load)  # fmt: skip
        text = format_status(
            {"mode": "client", "node_id": "ab" * 16, "version": "0.1.0", "uptime_s": 75.2,
             "listen": "127.0.0.1:11434", "ollama": None, "peers": [good, peer]},
            "http://127.0.0.1:11434",
        )  # fmt: skip
        self.assertEqual(
            text.splitlines(),
            [
                "Ollana   http://127.0.0.1:11434",
                "Mode     client",
                "Node     " + "ab" * 16,
                "Version  0.1.0",
                "Uptime   1 min 15 s",
                "Listen   127.0.0.1:11434",
                "",
                "SERVER            SOURCE      HEALTH     LATENCY  ACTIVE/TOTAL  FAILURES  MODELS",
                "198.18.0.2:11435  discovered  healthy    3.2 ms   1/12          0         "
                "echo:latest, llama3.2:latest",
                "[fd00::2]:11435   static      UNHEALTHY  -        0/12          3         -",
                "",
                "SERVER            LOADED       SLOTS BUSY/FREE  QUEUE",
                "198.18.0.2:11435  echo:latest  2/0              1",
                "[fd00::2]:11435   -            -                -",
                "",
                "Unhealthy servers:",
                "  [fd00::2]:11435: connection refused",
            ],
        )

    def test_client_without_reports(self) -> None:
        """Servers that report no load (not yet, or older ones): no load table."""
        peer = {"address": "198.18.0.2", "port": 11435, "source": "static", "healthy": True,
                "latency_ms": 1.0, "models": [], "state": None}  # fmt: skip
        text = format_status({"mode": "client", "peers": [peer]}, "http://127.0.0.1:11434")
        self.assertNotIn("LOADED", text)
        self.assertEqual(text.splitlines()[-1].split()[0], "198.18.0.2:11435")

    def test_client_without_servers(self) -> None:
        text = format_status({"mode": "client", "peers": []}, "http://127.0.0.1:11434")
        self.assertIn("No servers known yet", text)

    def test_server_with_ollama_down(self) -> None:
        text = format_status(
            {"mode": "server", "ollama": {"url": "http://127.0.0.1:11434", "healthy": False,
             "version": None, "reason": "connection refused"}, "peers": []},
            "http://127.0.0.1:11435",
        )  # fmt: skip
        self.assertIn("Ollama   http://127.0.0.1:11434 (DOWN: connection refused)", text)
        self.assertNotIn("SERVER", text)
        self.assertNotIn("Slots", text)  # a status without a load report (an older server)

    def test_server_load(self) -> None:
        load = {"parallel": 2, "max_queue": 512, "max_loaded": 3,
                "loaded": ["echo:latest", "llama3.2:latest"],
                "models": {"echo:latest": {"in_flight": 3, "waiting": 1}}, "slots_busy": 2,
                "slots_free": 2, "queue": 1}  # fmt: skip
        text = format_status(
            {"mode": "server", "ollama": {"url": "http://127.0.0.1:11434", "healthy": True,
             "version": "0.12.0"}, "peers": [], "state": load},
            "http://127.0.0.1:11435",
        )  # fmt: skip
        self.assertEqual(
            text.splitlines()[-4:],
            [
                "Ollama   http://127.0.0.1:11434 (up, version 0.12.0)",
                "Loaded   echo:latest, llama3.2:latest (at most 3)",
                "Slots    2 busy, 2 free (2 per model)",
                "Queue    1 (Ollama queues up to 512)",
            ],
        )


class StatusAddressTests(SynchronousTestCase):
    """Where ollana status asks: --url, or $OLLAMA_HOST first (as ollama would), then the
    client's and the server's ports on this machine."""

    def urls(self, env: dict[str, str], *argv: str) -> list[str]:
        options = StatusOptions(environ=env)
        options.parseOptions(list(argv))
        return list(options["urls"])

    def test_ollama_host_first(self) -> None:
        defaults = list(STATUS_URLS)
        self.assertEqual(self.urls({}), defaults)
        self.assertEqual(self.urls({"OLLAMA_HOST": " "}), defaults)
        self.assertEqual(self.urls({"OLLAMA_HOST": "gpu.lan"}), ["http://gpu.lan:11434", *defaults])
        self.assertEqual(
            self.urls({"OLLAMA_HOST": "https://gpu.lan"}), ["https://gpu.lan:443", *defaults]
        )
        self.assertEqual(self.urls({"OLLAMA_HOST": "[::1]:8080"}), ["http://[::1]:8080", *defaults])
        self.assertEqual(self.urls({"OLLAMA_HOST": "0.0.0.0"}), defaults, "asked once")
        self.assertEqual(
            self.urls({"OLLAMA_HOST": ":11435"}), [defaults[1], defaults[0]], "asked first"
        )
        self.assertEqual(self.urls({"OLLAMA_HOST": "gpu.lan"}, "--url", ":1"),
                         ["http://127.0.0.1:1"], "--url wins")  # fmt: skip

    def test_a_bad_ollama_host_is_one_line(self) -> None:
        e = self.assertRaises(UsageError, self.urls, {"OLLAMA_HOST": "ftp://gpu.lan"})
        self.assertEqual(str(e), "OLLAMA_HOST: scheme must be http or https, not 'ftp'")


class StatusTests(TestCase):
    """ollana status against nodes in this process."""

    timeout = 60

    async def start(self, *args: str) -> tuple[Any, int]:
        options = Options()
        options.parseOptions(["--listen", LOOPBACK, "--no-discovery", *args])
        node = makeService(options, reactor=reactor)
        node.startService()
        self.addCleanup(node.stopService)
        port: int = await node.getServiceNamed("http").whenListening()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(
            accepted_connections_closed(reactor, port)))  # fmt: skip
        return node, port

    async def setUpNodes(self) -> None:
        self.fake = FakeOllama(models=["echo:latest"], clock=reactor)
        listening = reactor.listenTCP(0, self.fake.site(), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.ollama = f"http://127.0.0.1:{listening.getHost().port}"
        _, self.server_port = await self.start("--mode", "server", "--ollama", self.ollama)
        self.client, self.client_port = await self.start(
            "--mode", "client", "--peer", f"127.0.0.1:{self.server_port}"
        )
        await eventually(
            reactor, lambda: all(p.healthy and p.models and p.state for p in self.client.pool)
        )

    async def status(self, *argv: str) -> tuple[int, str, str]:
        options = StatusOptions()
        options.parseOptions(list(argv))
        out, err = io.StringIO(), io.StringIO()
        code = await status(reactor, options, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_client_table(self) -> None:
        await self.setUpNodes()
        code, out, err = await self.status("--url", f"http://127.0.0.1:{self.client_port}")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"Ollana   http://127.0.0.1:{self.client_port}")
        self.assertIn("Mode     client", lines)
        self.assertIn(f"Listen   127.0.0.1:{self.client_port}", lines)
        row, load = [line for line in lines if line.startswith(f"127.0.0.1:{self.server_port} ")]
        self.assertEqual(row.split()[1:3], ["static", "healthy"])
        self.assertTrue(row.endswith("echo:latest"), row)
        self.assertEqual(load.split()[1:], ["none", "0/0", "0"])  # the fake loads nothing

    async def test_server_table(self) -> None:
        await self.setUpNodes()
        code, out, _ = await self.status("--url", f":{self.server_port}")
        self.assertEqual(code, 0)
        self.assertIn("Mode     server", out)
        self.assertIn(f"Ollama   {self.ollama} (up, version 0.12.0)", out)
        self.assertRegex(out, r"\nLoaded   none \(at most \d+\)\nSlots    0 busy, 0 free \(\d+ "
                         r"per model\)\nQueue    0 \(Ollama queues up to \d+\)\n")  # fmt: skip

    async def test_json(self) -> None:
        await self.setUpNodes()
        code, out, _ = await self.status("--json", "--url", f"127.0.0.1:{self.client_port}")
        self.assertEqual(code, 0)
        answer = json.loads(out)
        self.assertEqual(answer["mode"], "client")
        [peer] = answer["peers"]
        self.assertEqual((peer["address"], peer["port"]), ("127.0.0.1", self.server_port))

    async def test_falls_back_to_the_next_default(self) -> None:
        await self.setUpNodes()
        free = f"http://127.0.0.1:{free_tcp_port()}"
        server = f"http://127.0.0.1:{self.server_port}"
        self.patch(ollana.cli.status, "STATUS_URLS", (free, server))
        code, out, err = await self.status()
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"Ollana   {server}", out)
        self.assertEqual(out.splitlines()[-1], f"Asked {free} first: connection refused.")
        code, out, err = await self.status("--json")
        self.assertEqual(json.loads(out)["mode"], "server")
        self.assertEqual(err, f"ollana: Asked {free} first: connection refused.\n")

    async def test_nothing_listens(self) -> None:
        free = f"http://127.0.0.1:{free_tcp_port()}"
        code, out, err = await self.status("--url", free)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            f"ollana: no Ollana answered: {free}: connection refused\n",
        )
        other = f"http://127.0.0.1:{free_tcp_port()}"
        self.patch(ollana.cli.status, "STATUS_URLS", (free, other))
        code, out, err = await self.status()
        self.assertEqual(code, 1)
        self.assertIn(free, err)
        self.assertIn(other, err)
        self.assertIn("Is Ollana running on this machine?", err)

    async def test_a_plain_ollama_is_not_ollana(self) -> None:
        listening = reactor.listenTCP(0, FakeOllama().site(), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        url = f"http://127.0.0.1:{listening.getHost().port}"
        code, _, err = await self.status("--url", url)
        self.assertEqual(code, 1)
        self.assertIn(f"{url}: HTTP 404, so not an Ollana (a plain Ollama?)", err)
        await accepted_connections_closed(reactor, listening.getHost().port)

    async def test_ollama_host_is_asked_first(self) -> None:
        await self.setUpNodes()
        env = {**python_env(), "OLLAMA_HOST": f"127.0.0.1:{self.server_port}"}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "ollana", "status"], env=env, path=str(REPO)
        )
        self.assertEqual((code, err), (0, b""))
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], f"Ollana   http://127.0.0.1:{self.server_port}")
        self.assertNotIn("Asked", out.decode(), "nothing asked before it")

    async def test_exit_status_of_the_command(self) -> None:
        free = f"http://127.0.0.1:{free_tcp_port()}"
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "ollana", "status", "--url", free], env=python_env(),
            path=str(REPO),
        )  # fmt: skip
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err.decode().count("\n"), 1, err)
        self.assertIn(free, err.decode())


class ServeProcessTests(TestCase):
    """ollana serve for real, as a server on loopback without discovery."""

    timeout = 120

    def setUp(self) -> None:
        self.fake = FakeOllama()
        listening = reactor.listenTCP(0, self.fake.site(), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.ollama = f"http://127.0.0.1:{listening.getHost().port}"

    async def get(self, url: str) -> Any:
        response = await treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False))
        return response.code, await response.json()

    async def test_foreground(self) -> None:
        child = ChildProcess.spawn(
            reactor, ["-m", "ollana", "serve", *SERVER, "--ollama", self.ollama]
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        match = await child.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        code, body = await self.get(f"http://127.0.0.1:{match.group(1)}/api/version")
        self.assertEqual((code, body), (200, {"version": "0.12.0"}))
        await child.stop()
        self.assertEqual((child.exit_code, child.exit_signal), (None, signal.SIGTERM))
        self.assertIn("Server Shut Down.", child.output())
        self.assertNotIn("Traceback", child.output())

    async def test_foreground_json_logs(self) -> None:
        child = ChildProcess.spawn(
            reactor,
            ["-m", "ollana", "serve", "--log-format", "json", *SERVER, "--ollama", self.ollama],
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        match = await child.wait_for(r'^\{.*"Listening for HTTP on 127\.0\.0\.1:\d+"')
        event = json.loads(match.string)
        self.assertEqual((event["level"], event["host"]), ("info", "127.0.0.1"))
        code, _ = await self.get(f"http://127.0.0.1:{event['port']}/api/version")
        self.assertEqual(code, 200)
        await child.stop()
        for line in child.lines:
            json.loads(line)

    async def test_daemon(self) -> None:
        run = os.path.abspath(self.mktemp())
        pidfile = os.path.join(run, "run", "ollana.pid")
        logfile = os.path.join(run, "log", "ollana.log")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "ollana", "serve", "-d", "--pidfile", pidfile, "--logfile", logfile,
             *SERVER, "--ollama", self.ollama],
            env=python_env(),
            path=str(REPO),
        )  # fmt: skip
        self.assertEqual((code, err), (0, b""))
        started = re.fullmatch(
            r"Ollana listens on 127\.0\.0\.1:(\d+), in the background as process (\d+) "
            rf"\(pidfile {re.escape(tilde(pidfile))}, log {re.escape(tilde(logfile))}\)\n",
            out.decode(),
        )
        assert started is not None, out
        port, pid = started.group(1), int(started.group(2))
        self.addCleanup(kill_quietly, pid)
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), pid)
        code, _ = await self.get(f"http://127.0.0.1:{port}/api/version")  # at once
        self.assertEqual(code, 200)

        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "ollana", "serve", "-d", "--pidfile", pidfile, *SERVER],
            env=python_env(),
            path=str(REPO),
        )  # fmt: skip
        self.assertEqual(code, 1)
        self.assertEqual(
            err.decode(),
            f"ollana: Ollana already runs as process {pid} (pidfile {tilde(pidfile)}); "
            "stop it first\n",
        )

        os.kill(pid, signal.SIGTERM)
        await eventually(reactor, lambda: not os.path.exists(pidfile) and not process_alive(pid))
        self.assertIn("Server Shut Down.", read_text(logfile))
        self.assertNotIn("Traceback", read_text(logfile))

    async def test_daemon_that_cannot_listen_says_why(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = os.path.abspath(self.mktemp())
        pidfile, logfile = os.path.join(run, "ollana.pid"), os.path.join(run, "ollana.log")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "ollana", "serve", "-d", "--pidfile", pidfile, "--logfile", logfile,
             "--mode", "server", "--no-discovery", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--ollama", self.ollama],
            env=python_env(),
            path=str(REPO),
        )  # fmt: skip
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(
            err.decode(),
            f"ollana: Cannot listen on TCP port {port} on 127.0.0.1: Address already in use. "
            "Choose another with --listen.\n",
        )
        await eventually(reactor, lambda: not os.path.exists(pidfile), what="the pidfile gone")
        self.assertIn("Address already in use", read_text(logfile))

    async def test_a_second_ctrl_c_stops_at_once(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        fake.gated = True
        ollama = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")
        self.addCleanup(ollama.stopListening)
        child = ChildProcess.spawn(reactor, [
            "-m", "ollana", "serve", *SERVER, "--drain-timeout", "60",
            "--ollama", f"http://127.0.0.1:{ollama.getHost().port}",
        ])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        port = (await child.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")).group(1)
        pool = HTTPConnectionPool(reactor, persistent=False)
        streaming = treq.post(f"http://127.0.0.1:{port}/api/generate", pool=pool,
                              json={"model": "llama3.2", "prompt": "a b c"})  # fmt: skip
        fake.release()
        response = await streaming
        child.signal("INT")
        await child.wait_for(r"Letting 1 request\(s\) finish, for up to 60 s")
        asked = reactor.seconds()
        child.signal("INT")
        await child.when_ended()
        self.assertLess(reactor.seconds() - asked, 10, "not the 60 s of the drain")
        self.assertEqual(child.exit_signal, signal.SIGINT, child.output())
        self.assertRegex(child.output(), r"SIGINT again: stopping now, closing \d+ connection")
        self.assertNotIn("Traceback", child.output())
        self.assertNotIn("ReactorNotRunning", child.output())
        self.assertIn("Server Shut Down.", child.output())
        await self.assertFailure(response.content(), ResponseFailed)


class StartedTests(SynchronousTestCase):
    """What ollana serve -d says, from the daemon's line on its pipe."""

    def setUp(self) -> None:
        self.log = os.path.abspath(self.mktemp())
        self.command = TwistdCommand([], "/run/o.pid", self.log, {})

    def test_lines(self) -> None:
        self.assertEqual(
            started("ready 42 127.0.0.1:11435", self.command, 30),
            (0, "Ollana listens on 127.0.0.1:11435, in the background as process 42 "
                f"(pidfile /run/o.pid, log {tilde(self.log)})"),
        )  # fmt: skip
        self.assertEqual(
            started("failed Cannot listen on UDP port 11436: in use.", self.command, 30),
            (1, "ollana: Cannot listen on UDP port 11436: in use."),
        )
        self.assertEqual(
            started(None, self.command, 30),
            (1, f"ollana: Ollana does not listen after 30 s; see its log {tilde(self.log)}"),
        )

    def test_a_daemon_gone_without_a_word_is_read_from_its_log(self) -> None:
        gone = (1, f"ollana: Ollana stopped as it started: see its log {tilde(self.log)}")
        self.assertEqual(started("", self.command, 30), gone, "no log yet")
        with open(self.log, "w") as f:
            f.write("2026-01-01T00:00:00+0000 [x#error] first\n"
                    "2026-01-01T00:00:01+0000 [x#critical] Cannot do it: at all\n"
                    "2026-01-01T00:00:02+0000 [x#info] Server Shut Down.\n")  # fmt: skip
        self.assertEqual(
            started("", self.command, 30),
            (1, "ollana: Ollana stopped as it started: Cannot do it: at all"),
        )
        with open(self.log, "a") as f:
            f.write(json.dumps({"level": "error", "message": "in JSON"}) + "\n{not json\n")
        self.assertEqual(
            started("", self.command, 30),
            (1, "ollana: Ollana stopped as it started: in JSON"),
        )

    def test_await_line(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.assertIsNone(await_line(read, 0.01), "nothing yet")
        os.write(write, b"ready 1 ")
        os.write(write, b"x\nmore")
        self.assertEqual(await_line(read, 1), "ready 1 x")
        os.close(write)
        read2, write2 = os.pipe()
        self.addCleanup(os.close, read2)
        os.close(write2)
        self.assertEqual(await_line(read2, 1), "", "closed without a word")


class DemoProcessTests(TestCase):
    """ollana demo for real: everything on loopback, discovery by loopback broadcast."""

    timeout = 120

    def demo(self, *args: str) -> ChildProcess:
        child = ChildProcess.spawn(reactor, ["-m", "ollana", "demo", *args])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def test_try_what_it_prints(self) -> None:
        child = self.demo("--port", "0")
        curl = await child.wait_for(r"curl (http://127\.0\.0\.1:(\d+)/api/generate) -d '(.*)'$")
        url, port, body = curl.group(1), curl.group(2), curl.group(3)
        self.assertEqual(json.loads(body), {"model": "echo", "prompt": "hello there"})
        await child.wait_for(rf"OLLAMA_HOST=127\.0\.0\.1:{port} ollama run echo hi")
        await child.wait_for(rf"http://127\.0\.0\.1:{port}/ollana/")
        await child.wait_for(r"Ctrl-C stops the demo\.")

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.post(url, data=body.encode(), pool=pool)
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("X-Ollana-Peer"), "via the server")
        chunks: list[bytes] = []
        await treq.collect(response, chunks.append)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertEqual([line["response"] for line in lines], ["hello ", "there ", ""])
        self.assertEqual([line["done"] for line in lines], [False, False, True])

        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "ollana", "status", "--url", f"127.0.0.1:{port}"],
            env=python_env(), path=str(REPO),
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(b"Mode     client", out)
        [row] = [line for line in out.decode().splitlines() if "discovered" in line]
        self.assertIn("healthy", row)
        self.assertTrue(row.endswith("echo:latest"), row)

        child.signal("INT")
        self.assertEqual(await child.when_ended(), 0, child.output())
        self.assertIn("Stopped.", child.lines)
        self.assertNotIn("Traceback", child.output())

    async def test_a_taken_port_falls_back_to_a_free_one(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = self.demo("--port", str(port), "--pace", "0")
        note = await child.wait_for(
            rf"127\.0\.0\.1:{port} is taken, .*; the client uses 127\.0\.0\.1:(\d+)\.\)"
        )
        curl = await child.wait_for(r"curl http://127\.0\.0\.1:(\d+)/")
        self.assertEqual(curl.group(1), note.group(1))
        self.assertNotEqual(curl.group(1), str(port))
        child.signal("TERM")
        self.assertEqual(await child.when_ended(), 0, child.output())
        self.assertNotIn("Traceback", child.output())


class SimulatorTests(SynchronousTestCase):
    """The demo's simulated Ollama: what the ollama command asks before it runs a model."""

    def test_echo_without_a_tag(self) -> None:
        fake = FakeOllama(models=[ECHO_MODEL], record=False)
        stub: Any = StubTreq(fake.resource())
        shown = self.successResultOf(stub.post("http://o/api/show", json={"model": "echo"}))
        self.assertEqual(shown.code, 200)
        body = self.successResultOf(shown.json())
        self.assertEqual(body["capabilities"], ["completion"])
        missing = self.successResultOf(stub.post("http://o/api/show", json={"name": "llama3.2"}))
        self.assertEqual(missing.code, 404)
        self.assertEqual((fake.requests, fake.headers), ([], []), "record=False keeps nothing")

    def test_quiet_site(self) -> None:
        self.assertIsInstance(FakeOllama().site(), Site)
        self.assertIsNot(type(FakeOllama().site(access_log=False)), Site)
