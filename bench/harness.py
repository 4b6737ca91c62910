"""Real processes for the benchmarks: started, waited for, and always stopped.

``with Processes(workdir) as processes:`` starts servers (each with its output in workdir),
waits until each is ready (a line with its port appears in its output or log, a port
answers, a URL answers 200) and stops every one at the end (SIGINT, then SIGKILL after
15 s), also on an error or Ctrl-C. Everything listens on 127.0.0.1; an Ollana node runs
with ``--no-discovery``, or broadcasts to 127.255.255.255 on a UDP port of its own.

A process imports Ollana from this tree, or from another checkout (``checkout=``, for a
``Processes`` or one process): that directory is its working directory and first on its
``PYTHONPATH``. Both matter: ``python -m``/``-c`` put the working directory before
``PYTHONPATH``, and twistd finds the ``twisted/plugins`` of the path's trees.
``ollana_origin`` says which ``ollana.tap`` twistd loads.
Also here: free ports, an HTTP GET that never raises, RSS sampling and the machine's
description, which every benchmark prints.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO

from ollana.demo import LOOPBACK_BROADCAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 30.0  # seconds for a process to be ready
STOP_TIMEOUT = 15.0  # seconds after SIGINT before SIGKILL
LOOPBACK = "tcp:0:interface=127.0.0.1"

# How each kind of process says which port it listens on.
LISTENING = re.compile(rb"Listening for HTTP on 127\.0\.0\.1:(\d+)")  # an Ollana node's log
PORT_LINE = re.compile(rb"port (\d+)")  # bench.servers, bench.faults serve
SIMULATOR = re.compile(rb"on http://127\.0\.0\.1:(\d+)")  # python -m ollana.simulator


class DidNotStart(SystemExit):
    """A process exited or stayed silent instead of getting ready (a SystemExit: a
    benchmark cannot go on without it, and its message says where the logs are)."""


class Processes:
    """The processes of one benchmark (or one part of it), stopped together at the end.

    Each is known by a name: its output goes to ``workdir/NAME.out``, an Ollana node logs
    to ``workdir/NAME.log``. checkout: the tree processes import Ollana from (and run
    in), unless a process is given its own; None: this one.
    """

    def __init__(self, workdir: str, checkout: str | None = None) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.checkout = checkout or ROOT
        self.started: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, IO[bytes]] = {}
        self._ready: dict[str, tuple[str, re.Pattern[bytes]]] = {}

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    # --- starting ---------------------------------------------------------------------

    def command(
        self,
        name: str,
        command: list[str],
        *,
        checkout: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a command with its output in workdir/NAME.out, from checkout if given,
        with env added to the environment."""
        out = open(self.path(f"{name}.out"), "w+b")  # noqa: SIM115 (closed with the run)
        process = subprocess.Popen(
            command,
            cwd=checkout or self.checkout,
            env={**environment(checkout or self.checkout), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.started.append(process)
        self.named[name] = process
        self.outputs[name] = out
        self._ready[name] = (self.path(f"{name}.out"), PORT_LINE)
        return process

    def python(
        self,
        name: str,
        *argv: str,
        ready: re.Pattern[bytes] = PORT_LINE,
        log: str | None = None,
        checkout: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``python ARGV``; it is ready when ready matches in its output (or in the
        file log), which names its port."""
        process = self.command(name, [sys.executable, *argv], checkout=checkout)
        self._ready[name] = (log or self.path(f"{name}.out"), ready)
        return process

    def helper(self, *args: str) -> int:
        """Start ``python -m bench.servers ARGS`` (named ARGS[0]); its port, once it listens."""
        self.python(args[0], "-m", "bench.servers", *args, checkout=ROOT)
        return self.port(args[0])

    def simulator(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a simulated Ollama (``python -m ollana.simulator --port 0 ARGS``)."""
        return self.python(name, "-m", "ollana.simulator", "--port", "0", *args, ready=SIMULATOR)

    def serve(self, name: str, *args: str, discovery: int = 0) -> subprocess.Popen[bytes]:
        """Start ``python -m ollana serve`` on 127.0.0.1, logging to workdir/NAME.log, with
        discovery off, or on loopback on the UDP port discovery."""
        log = self.path(f"{name}.log")
        argv = ["-m", "ollana", "serve", "--logfile", log, "--listen", LOOPBACK]
        return self.python(
            name, *argv, *discovery_options(discovery), *args, ready=LISTENING, log=log
        )

    def twistd(
        self, name: str, *args: str, discovery: int = 0, checkout: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``twistd -n --pidfile= ollana`` on 127.0.0.1 with Ollana's own log
        observer, as ``ollana serve`` starts it in production (its log, access lines
        included, in workdir/NAME.log), with discovery off, or on loopback on the UDP port
        discovery; from checkout if given (see the module docstring)."""
        log = self.path(f"{name}.log")
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logger=ollana.logs.text_observer",
            "ollana",
            "--listen",
            LOOPBACK,
            *discovery_options(discovery),
            *args,
        ]
        process = self.command(name, command, checkout=checkout, env={"OLLANA_LOGFILE": log})
        self._ready[name] = (log, LISTENING)
        return process

    def path(self, filename: str) -> str:
        return os.path.join(self.workdir, filename)

    # --- readiness --------------------------------------------------------------------

    def port(self, name: str) -> int:
        """The port the process name says it listens on, once it has said so."""
        path, pattern = self._ready[name]
        with open(path, "a+b") as stream:  # created now if the process has not yet
            return int(self.wait_line(name, stream, pattern).group(1))

    def wait_line(
        self, name: str, stream: IO[bytes], pattern: re.Pattern[bytes]
    ) -> re.Match[bytes]:
        """Until pattern matches in stream (read from its start each time), as long as the
        process name runs."""
        process = self.named[name]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            stream.seek(0)
            found = pattern.search(stream.read())
            if found:
                return found
            if process.poll() is not None:
                raise DidNotStart(f"{name} exited ({process.returncode}); see {self.workdir}")
            time.sleep(0.05)
        raise DidNotStart(f"{name} did not start within {START_TIMEOUT:g} s; see {self.workdir}")

    def wait_port(self, name: str, port: int) -> int:
        """Until 127.0.0.1:port accepts a connection (for what cannot print its port)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if time.monotonic() > deadline:
                    raise DidNotStart(f"{name} did not start; see {self.workdir}") from None
                time.sleep(0.05)

    # --- stopping ---------------------------------------------------------------------

    def stop(self, process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)
        for out in self.outputs.values():
            out.close()

    def exited(self) -> str:
        """The last lines of what each process that exited wrote (output and log)."""
        lines = []
        for name, process in self.named.items():
            if process.poll() is None:
                continue
            for filename in (f"{name}.out", f"{name}.log"):
                try:
                    with open(self.path(filename), errors="replace") as out:
                        lines += [
                            f"    {filename}: {line.rstrip()}" for line in out.readlines()[-8:]
                        ]
                except OSError:
                    pass
        return "\n".join(lines)


def environment(checkout: str) -> dict[str, str]:
    """The environment of a process: checkout first on the path, and nothing that would
    point Ollana elsewhere."""
    env = dict(os.environ)
    env["PYTHONPATH"] = checkout + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OLLANA_SECRET", None)
    env.pop("OLLAMA_HOST", None)
    return env


def discovery_options(port: int) -> list[str]:
    """A node's discovery options: off, or on loopback only on the UDP port port."""
    if not port:
        return ["--no-discovery"]
    return ["--broadcast", LOOPBACK_BROADCAST, "--discovery-port", str(port)]


def stop_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does: through its ``with Processes``, so that
    no server outlives it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def ollana_origin(checkout: str | None = None) -> str:
    """The file of the ``ollana.tap`` that twistd's ollana plugin loads in a process the
    harness starts from checkout (None: this tree), found as twistd finds it."""
    code = (
        "import importlib\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "maker = next(p for p in getPlugins(IServiceMaker) if p.tapname == 'ollana')\n"
        "print(importlib.import_module(maker.module).__file__)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=checkout or ROOT,
        env=environment(checkout or ROOT),
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"no ollana twistd plugin in {checkout or ROOT}: {found.stderr.strip()}")
    return found.stdout.strip()


def code_version(tree: str = ROOT) -> str:
    """The commit a tree is at, and whether its ollana/ differs from it."""
    git = ["git", "-C", tree]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run([*git, "status", "--porcelain", "ollana"], capture_output=True,
                                 text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" with uncommitted changes to ollana/" if changed else "")


# --- ports and probes -----------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for nginx, which cannot be told to pick one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, accept: tuple[int, ...] = (200,)) -> None:
    """Until GET url answers 200 (client mode needs its first health check first)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status in accept:
                    return
        except urllib.error.HTTPError as e:
            if e.code in accept:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DidNotStart(f"{url} did not answer 200 within {START_TIMEOUT:g} s")
        time.sleep(0.1)


def get(port: int, path: str, timeout: float = 0.5) -> tuple[int, bytes]:
    """Status and body of GET http://127.0.0.1:port/path, on a new connection; (0, b"")
    when it fails."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        connection.close()


# --- the machine and the processes' memory --------------------------------------------


class RSSSampler:
    """The resident memory of a process (and its children: nginx's worker), sampled
    every 20 ms in a thread, to find the peak."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.process = psutil.Process(pid)
        self.baseline = self.now()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        processes = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> tuple[int, int]:
        """(baseline, peak) in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.baseline, self.peak


def cpu_seconds(pids: list[int]) -> float:
    """The CPU time (user and system) the processes and their children have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        process = psutil.Process(pid)
        for each in (process, *process.children(recursive=True)):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def machine() -> str:
    """The machine in one line: CPU model, cores, memory, kernel, Python, Twisted."""
    import platform

    import psutil

    import twisted

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, Twisted {twisted.__version__}"
    )


def raise_file_limit() -> None:
    """1,000 streams need some 3,000 descriptors across the processes: raise the soft limit
    to the hard one (the processes started inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def post(
    port: int, path: bytes, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
    """POST a JSON body to 127.0.0.1:port on a connection of its own (closed after the
    answer): the reader of the answer's body, the writer to close, the status and the
    head's headers by lower-case name."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (path, port, len(body), body)
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    except BaseException:
        writer.close()
        raise
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    return reader, writer, int(head[0].split()[1]), headers
