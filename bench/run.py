"""How fast is Ollana's proxy, next to nginx and Twisted's stock proxy? One run, on
loopback, every server in its own process. From the repository's root::

    python -m bench.run                          # all of it, about 13 minutes
    python -m bench.run --seconds 3              # shorter rows
    python -m bench.run --parts get,streams      # some of it
    python -m bench.run --profile --parts get    # and where the one-hop node's time goes
    python -m bench.run --chart docs/benchmarks.svg --json results.json

Targets, all on 127.0.0.1 with ports picked at start (nothing on the LAN): **direct** (the
backend itself), **stock** (``twisted.web.proxy.ReverseProxyResource``, with Twisted's
access log), **nginx** (a streaming reverse proxy: ``proxy_buffering off``, HTTP/1.1
kept-alive upstream connections, access log; one worker process, as Ollana is one
process), **ollana 1 hop** (server mode in front of the backend) and **ollana 2 hops**
(client mode in front of that, so: client -> server -> backend); and, for the small GET,
**twisted.web** (not a proxy: a twisted.web site answering a constant, the ceiling of
any proxy on twisted.web's server side). Ollana runs under
``twistd -n`` with its access log in a file, as in production.

Parts (``--parts``):

- **get**: a small GET (``--path``, default ``/api/version``) with wrk (one thread,
  keep-alive) for ``--seconds`` at each ``--concurrency`` (default 1 and 32), after a
  one-second warm-up. The backend is nginx serving static files when nginx is installed
  (else Ollana's simulated Ollama). Prints req/s, p50, p99, ratios against stock, nginx
  and direct, and the p50 latency each hop adds at concurrency 1.
- **streams**: ``--streams`` (200) clients POST /api/generate back to back to a
  streaming backend (``bench.servers streamer``: 20 to 60 NDJSON lines, 20 a second,
  each stamped with the time it was written) and every line's delay is measured at the
  client (``bench.streams``); p50/p99/max, and what each proxy adds to direct's.
- **memory**: ``--hold`` (1,000) slow streams opened at once and held; the proxy's RSS
  (nginx: master and worker) before, while held, and at its peak (sampled every 20 ms).
- **blob**: one POST of ``--blob`` bytes (1 GiB) to a backend that drops it: time,
  throughput and the proxy's RSS growth.
- **timings** (``bench.timings``): from starting a server process to the first answer
  through a client that finds it by loopback broadcast; and a client with two servers
  under steady load, one SIGKILLed: failed requests, how soon no request went to it.
- **routing** (``bench.routing``, about 5 minutes): chat users' time to first token
  through two client nodes and three servers in front of simulated Ollamas, for each
  ``--strategy``, two seeds each; ``python -m bench.routing`` runs it alone, with its
  chart and every request.

After each part, the errors the proxies logged (Python tracebacks; nginx's error lines).
The chart (``--chart``, an SVG) shows the small GET, the streams' p99 and the memory.

Nothing is installed by this script. wrk (``apt-get install wrk``) is needed for
absolute rates; without it ``bench.loadgen`` (Python, much slower) stands in. nginx
(``apt-get install nginx-light``) is optional: without it its rows are left out.
``--profile`` needs py-spy (``pip install py-spy``) and the right to trace (root). The
machine matters: load generator, proxies and backend share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

from bench import chart, nginx, timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 30.0


@dataclass
class Result:
    """One measurement: a target at one concurrency."""

    target: str
    concurrency: int
    rps: float
    p50: float  # seconds
    p99: float  # seconds
    errors: int  # socket errors and non-2xx answers


class Processes:
    """The servers started, to be stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, workdir: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, IO[bytes]] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("OLLANA_SECRET", None)
        env.pop("OLLAMA_HOST", None)
        return env

    def command(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start a command with its output in the run's directory."""
        out = open(os.path.join(self.workdir, f"{name}.out"), "w+b")  # noqa: SIM115
        process = subprocess.Popen(
            command, cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT
        )
        self.started.append(process)
        self.named[name] = process
        self.outputs[name] = out
        return process

    def pid_of(self, target: str) -> int:
        """The process of a target (for its memory)."""
        names = {
            "direct": "streamer",
            "stock": "stock",
            "nginx": "nginx-proxy",
            "ollana 1 hop": "one-hop",
            "ollana 2 hops": "two-hops",
        }
        return self.named[names.get(target, target)].pid

    def helper(self, *args: str) -> int:
        """Start ``python -m bench.servers ARGS`` and return the port it listens on."""
        process = self.command(args[0], [sys.executable, "-m", "bench.servers", *args])
        return self._port_from(self.outputs[args[0]], re.compile(rb"port (\d+)"), process, args[0])

    def ollana(self, name: str, *args: str) -> int:
        """Start ``twistd -n --pidfile= ollana ARGS`` and return the port it listens on."""
        logfile = os.path.join(self.workdir, f"{name}.log")
        twistd = ["-n", "--pidfile=", f"--logfile={logfile}"]
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            *twistd,
            "ollana",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--no-discovery",
            *args,
        ]
        process = self.command(name, command)
        with open(logfile, "a+b") as log:  # created now if twistd has not yet
            return self._port_from(log, re.compile(LISTENING.pattern.encode()), process, name)

    def _port_from(
        self,
        stream: IO[bytes],
        pattern: re.Pattern[bytes],
        process: subprocess.Popen[bytes],
        name: str,
    ) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            stream.seek(0)
            found = pattern.search(stream.read())
            if found:
                return int(found.group(1))
            if process.poll() is not None:
                raise SystemExit(f"{name} exited ({process.returncode}); see {self.workdir}")
            time.sleep(0.05)
        raise SystemExit(f"{name} did not start within {START_TIMEOUT:g} s; see {self.workdir}")

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
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
            raise SystemExit(f"{url} did not answer 200 within {START_TIMEOUT:g} s")
        time.sleep(0.1)


# --- load generators ------------------------------------------------------------------

UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def wrk(url: str, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """requests/s, p50, p99 and errors of ``wrk --latency`` (one thread)."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return rps, p50, p99, errors + (int(non_2xx.group(1)) if non_2xx else 0)


def builtin(url: str, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """The same figures from bench.loadgen, in its own process."""
    command = [sys.executable, "-m", "bench.loadgen", url, str(concurrency), str(seconds)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return report["rps"], report["p50"], report["p99"], report["errors"] + report["non_2xx"]


# --- the run ----------------------------------------------------------------------------


def measure(
    targets: dict[str, str], concurrencies: list[int], seconds: float, load: str
) -> list[Result]:
    generate = wrk if load == "wrk" else builtin
    results = []
    for name, url in targets.items():
        generate(url, max(concurrencies), 1)  # warm-up: connections, caches, JIT-less Python
        for concurrency in concurrencies:
            rps, p50, p99, errors = generate(url, concurrency, seconds)
            results.append(Result(name, concurrency, rps, p50, p99, errors))
            line = (
                f"  {name:<14} c={concurrency:<3} {rps:9.0f} req/s  p50 {p50 * 1e3:7.3f} ms"
                f"  p99 {p99 * 1e3:7.3f} ms  errors {errors}"
            )
            print(line, file=sys.stderr, flush=True)
    return results


def rst_table(header: list[str], rows: list[list[str]]) -> str:
    """A reStructuredText simple table: readable here, and pasted as is into the docs."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([rule, line(header), rule, *(line(row) for row in rows), rule])


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: list[Result], hops: dict[str, int]) -> str:
    """The small GET's table, with ratios, and the latency each hop adds."""
    by = {(r.target, r.concurrency): r for r in results}
    rows = []
    for r in results:
        base = {name: by.get((name, r.concurrency)) for name in ("stock", "nginx", "direct")}
        rows.append(
            [
                r.target,
                str(r.concurrency),
                f"{r.rps:.0f}",
                f"{r.p50 * 1e3:.3f}",
                f"{r.p99 * 1e3:.3f}",
                str(r.errors),
                *(_ratio(r.rps, b.rps if b else None) for b in base.values()),
            ]
        )
    header = [
        "target",
        "conc",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "× stock",
        "× nginx",
        "× direct",
    ]
    lines = [rst_table(header, rows)]
    low = min(r.concurrency for r in results)
    direct = by.get(("direct", low))
    if direct is not None:
        lines += ["", f"Latency added at concurrency {low} (p50 minus direct's p50):", ""]
        for target, count in hops.items():
            row = by.get((target, low))
            if row is not None:
                added = (row.p50 - direct.p50) * 1e3
                per = f", {added / count:.3f} ms per hop" if count > 1 else ""
                lines.append(f"- {target}: {added:.3f} ms{per}")
    return "\n".join(lines)


def delay_table(rows: dict[str, dict[str, float]], streams: int) -> str:
    """Per-line delay of NDJSON streams, and what each proxy adds to direct's."""
    direct = rows.get("direct")
    out = []
    for name, r in rows.items():
        added50 = (r["p50"] - direct["p50"]) * 1e3 if direct and name != "direct" else None
        added99 = (r["p99"] - direct["p99"]) * 1e3 if direct and name != "direct" else None
        out.append(
            [
                name,
                f"{r['lines']:.0f}",
                f"{r['p50'] * 1e3:.2f}",
                f"{r['p99'] * 1e3:.2f}",
                f"{r['max'] * 1e3:.1f}",
                "-" if added50 is None else f"{added50:.2f}",
                "-" if added99 is None else f"{added99:.2f}",
                f"{r['errors']:.0f}",
            ]
        )
    header = ["target", "lines", "p50 ms", "p99 ms", "max ms", "added p50", "added p99", "errors"]
    title = (
        f"NDJSON streams: {streams} concurrent, 20 lines/s each; delay from the backend's "
        "write to the load generator's read, per line"
    )
    return title + "\n\n" + rst_table(header, out)


def memory_table(rows: dict[str, dict[str, float]], streams: int) -> str:
    out = [
        [
            name,
            f"{r['opened']:.0f}",
            f"{r['baseline_mb']:.1f}",
            f"{r['held_mb']:.1f}",
            f"{r['peak_mb']:.1f}",
            f"{r['errors']:.0f}",
        ]
        for name, r in rows.items()
    ]
    header = ["proxy", "streams open", "idle RSS MB", "RSS held MB", "peak RSS MB", "errors"]
    title = f"Memory: {streams} streams opened at once and held (a line a second each)"
    return title + "\n\n" + rst_table(header, out)


def blob_table(rows: dict[str, dict[str, float]], size: int) -> str:
    out = [
        [
            name,
            f"{r['status']:.0f}",
            f"{r['seconds']:.2f}",
            f"{r['mib_per_s']:.0f}",
            f"{r['growth_mb']:.1f}" if "growth_mb" in r else "-",
        ]
        for name, r in rows.items()
    ]
    header = ["target", "status", "seconds", "MiB/s", "RSS growth MB"]
    title = f"Upload: one POST of {size / 2**20:.0f} MiB (a model blob) to a backend that drops it"
    return title + "\n\n" + rst_table(header, out)


# Where a sampled stack's time goes: the first frame from the leaf up whose file is named
# here decides (Deferred and other plumbing frames are passed over).
COMPONENTS = [
    ("access log (twisted.logger, twistd's file observer)",
     ("twisted/logger/", "twisted/python/logfile.py", "twisted/python/log.py")),
    ("upstream client (ollana.httpclient, httptools)", ("ollana/httpclient.py",)),
    ("Ollana's exchange (routing, gate, metrics)",
     ("ollana/", "prometheus_client/")),
    ("twisted.web server side (request parsing, Request, Headers)",
     ("twisted/web/", "twisted/protocols/basic.py")),
    ("reactor and sockets (epoll, reads, sends)", ("twisted/internet/",)),
]  # fmt: skip


def component(stack: list[str]) -> str:
    for frame in reversed(stack):
        if "defer.py" in frame or "twisted/python/" in frame and "logfile" not in frame:
            continue
        for name, paths in COMPONENTS:
            if any(path in frame for path in paths):
                return name
    return "other"


def profile(url: str, pid: int, concurrency: int, seconds: float, load: str, workdir: str) -> str:
    """Sample the one-hop node with py-spy under load; its time by component, and the
    functions with the most time of their own."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")  # the virtualenv's
    spy = shutil.which("py-spy") or (beside if os.access(beside, os.X_OK) else None)
    if spy is None:
        return "py-spy is not installed (pip install py-spy): no profile."
    raw = os.path.join(workdir, "one-hop.pyspy")
    sampler = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "500",
         "--format", "raw", "--full-filenames", "--output", raw],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rps, _, _, _ = (wrk if load == "wrk" else builtin)(url, concurrency, seconds + 1)
    sampler.wait()
    if sampler.returncode != 0 or not os.path.exists(raw):
        return "py-spy could not sample the node (it needs ptrace: run as root, or see its docs)."
    by_component: dict[str, int] = {}
    own: dict[str, int] = {}
    idle = total = 0
    with open(raw) as samples:
        for line in samples:
            text, _, count = line.rstrip("\n").rpartition(" ")
            stack, n = text.split(";"), int(count)
            total += n
            if "doPoll" in stack[-1] or "epoll" in stack[-1].split(" ")[0]:
                idle += n  # waiting in epoll_wait
                continue
            name = component(stack)
            by_component[name] = by_component.get(name, 0) + n
            leaf = re.sub(r" \(.*/(.*?)\)$", r" (\1)", stack[-1])
            own[leaf] = own.get(leaf, 0) + n
    busy = total - idle
    share = 100 * busy / max(total, 1)
    rows = [[name, f"{100 * n / busy:.0f} %"] for name, n in
            sorted(by_component.items(), key=lambda item: -item[1])]  # fmt: skip
    title = (f"Profile of the one-hop node (py-spy, 500 Hz, {seconds:g} s at concurrency "
             f"{concurrency}, {rps:.0f} req/s while sampled; busy {share:.0f} % "
             "of the time): where its CPU time goes")  # fmt: skip
    top = sorted(own.items(), key=lambda item: -item[1])[:12]
    lines = [title, "", rst_table(["component", "share"], rows), "",
             "Functions with the most time of their own:", ""]  # fmt: skip
    lines += [f"- {100 * n / busy:4.1f} % {name}" for name, n in top]
    return "\n".join(lines)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for nginx, which cannot be told to pick one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nginx(processes: Processes, binary: str, name: str, backend: int | None) -> int:
    """nginx as a static backend (backend None) or as a proxy to backend; its port."""
    port = free_port()
    if backend is None:
        config = nginx.static_config(processes.workdir, name, port)
    else:
        config = nginx.proxy_config(processes.workdir, name, port, backend)
    processes.command(name, nginx.command(binary, processes.workdir, config))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nginx {name} did not start; see {processes.workdir}") from None
            time.sleep(0.05)


def proxies(processes: Processes, backend: int, nginx_binary: str | None) -> dict[str, str]:
    """The stock proxy, nginx (if any) and Ollana (one and two hops) in front of backend:
    name -> base URL, direct first."""
    stock = processes.helper("stock", str(backend), os.path.join(processes.workdir, "stock.log"))
    bases = {"direct": f"http://127.0.0.1:{backend}", "stock": f"http://127.0.0.1:{stock}"}
    if nginx_binary is not None:
        bases["nginx"] = (
            f"http://127.0.0.1:{start_nginx(processes, nginx_binary, 'nginx-proxy', backend)}"
        )
    # One load generator address opens up to 1,000 connections at once: above the
    # default per-source limit (256) of a server-mode node.
    one = processes.ollana(
        "one-hop", "--mode", "server", "--ollama", bases["direct"], "--max-connections", "4000"
    )
    two = processes.ollana("two-hops", "--mode", "client", "--peer", f"127.0.0.1:{one}")
    bases["ollana 1 hop"] = f"http://127.0.0.1:{one}"
    bases["ollana 2 hops"] = f"http://127.0.0.1:{two}"
    return bases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="per measurement [10]")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated [1,32]")
    parser.add_argument("--path", default="/api/version", help="the GET measured [/api/version]")
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "builtin"],
        default="auto",
        help="wrk, builtin (Twisted), or auto: wrk if installed",
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    parser.add_argument(
        "--parts",
        default="get,streams,memory,blob,timings,routing",
        help="what to measure, comma-separated [get,streams,memory,blob,timings,routing]",
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams timed [200]")
    parser.add_argument("--hold", type=int, default=1000, help="streams held open for RSS [1000]")
    parser.add_argument(
        "--blob", type=int, default=1 << 30, help="bytes of the blob upload [1 GiB]"
    )
    parser.add_argument(
        "--chart", default="bench-chart.svg", help="where to write the chart [bench-chart.svg]"
    )
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument(
        "--profile", action="store_true", help="then sample the one-hop node under load (py-spy)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory of logs (and profile)"
    )
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    parts = set(args.parts.split(","))
    unknown = parts - {"get", "streams", "memory", "blob", "timings", "routing"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")

    load = args.loadgen
    if load != "builtin" and shutil.which("wrk") is None:
        if load == "wrk":
            raise SystemExit("wrk is not installed: apt-get install wrk (Debian, Ubuntu)")
        print(
            "wrk is not installed (apt-get install wrk on Debian and Ubuntu); using the "
            "built-in Twisted load generator, whose figures are much lower.",
            file=sys.stderr,
        )
        load = "builtin"
    elif load == "auto":
        load = "wrk"
    nginx_binary = None if args.no_nginx else nginx.installed()
    if nginx_binary is None and not args.no_nginx:
        print(
            "nginx is not installed (apt-get install nginx-light): its rows are left out "
            "and the small GET's backend is Ollana's simulated Ollama.",
            file=sys.stderr,
        )
    _raise_file_limit()

    workdir = tempfile.mkdtemp(prefix="ollana-bench-")
    os.chmod(workdir, 0o755)  # nginx started as root serves as another user: it must enter
    figures: dict[str, object] = {"machine": machine()}
    print(f"Machine: {figures['machine']}")
    try:
        if "get" in parts:
            processes = Processes(os.path.join(workdir, "get"))
            try:
                figures["get"] = small_get(processes, args, concurrencies, load, nginx_binary)
            finally:
                processes.stop_all()
            print(errors_logged(processes.workdir))
        if parts & {"streams", "memory", "blob"}:
            processes = Processes(os.path.join(workdir, "streaming"))
            try:
                figures.update(streaming(processes, args, parts, nginx_binary))
            finally:
                processes.stop_all()
            print(errors_logged(processes.workdir))
        if "timings" in parts:
            processes = Processes(os.path.join(workdir, "timings"))
            try:
                backend = processes.helper("backend")
                startup: list[float] = []
                found = timings.discovery_time(processes, backend, startup=startup)
                failover = timings.failover_time(processes, backend)
                figures["timings"] = {"discovery": found, "startup": startup, "failover": failover}
                print()
                print(timings.report(found, failover, startup))
            finally:
                processes.stop_all()
        if "routing" in parts:
            from bench import routing  # not at the top: it builds on this module

            seeds = [1, 2]
            where = os.path.join(workdir, "routing")
            ttfts, _ = routing.measure(list(routing.STRATEGIES), seeds, where)
            figures["routing"] = ttfts
            print()
            print(routing.report(ttfts, seeds))
        if args.json:
            with open(args.json, "w") as out:
                json.dump(figures, out, indent=1, default=lambda r: r.__dict__)
        if "get" in parts or "streams" in parts:
            with open(args.chart, "w") as out:
                out.write(chart.svg(figures))
            print(f"\nChart: {args.chart}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"Logs: {workdir}", file=sys.stderr)


def errors_logged(workdir: str) -> str:
    """What the proxies logged as errors under all that load: Python tracebacks (stock,
    Ollana) and nginx's error-level lines."""
    counts = []
    for target, name in (
        ("stock", "stock.out"),
        ("nginx", "nginx-proxy-error.log"),
        ("ollana 1 hop", "one-hop.log"),
        ("ollana 2 hops", "two-hops.log"),
    ):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        if name.startswith("nginx"):
            found = len(re.findall(r"\[(?:error|crit|alert|emerg)\]", text))
        else:
            found = text.count("Traceback")
        counts.append(f"{target} {found}")
    return "\nErrors logged (tracebacks; for nginx, error lines): " + ", ".join(counts)


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


def _raise_file_limit() -> None:
    """1,000 streams need some 3,000 descriptors across the processes: raise the soft limit
    to the hard one (the processes started inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def small_get(
    processes: Processes,
    args: argparse.Namespace,
    concurrencies: list[int],
    load: str,
    nginx_binary: str | None,
) -> list[Result]:
    print("Starting the servers for the small GET...", file=sys.stderr)
    if nginx_binary is not None:
        backend = start_nginx(processes, nginx_binary, "nginx-static", None)
        backend_name = "nginx serving static files"
    else:
        backend = processes.helper("backend")
        backend_name = "Ollana's simulated Ollama"
    bases = proxies(processes, backend, nginx_binary)
    bases["twisted.web"] = f"http://127.0.0.1:{processes.helper('constant')}"  # a reference
    targets = {name: base + args.path for name, base in bases.items()}
    for url in targets.values():
        wait_ready(url)
    print(f"Measuring GET {args.path} with {load}, {args.seconds:g} s each:", file=sys.stderr)
    results = measure(targets, concurrencies, args.seconds, load)
    print()
    print(
        f"Small GET: GET {args.path}, backend {backend_name}, {load} with one thread and "
        f"keep-alive, {args.seconds:g} s per row"
    )
    print()
    print(table(results, {"stock": 1, "nginx": 1, "ollana 1 hop": 1, "ollana 2 hops": 2}))
    if args.profile:
        print()
        pid = processes.named["one-hop"].pid
        print(profile(targets["ollana 1 hop"], pid, max(concurrencies), args.seconds, load,
                      processes.workdir))  # fmt: skip
    return results


def streaming(
    processes: Processes, args: argparse.Namespace, parts: set[str], nginx_binary: str | None
) -> dict[str, object]:
    """Per-chunk delay at many streams, RSS with many streams open, a big upload."""
    print("Starting the servers for streaming...", file=sys.stderr)
    backend = processes.helper("streamer", "0.05", "40")  # 20 lines/s, 2 s per stream
    bases = proxies(processes, backend, nginx_binary)
    for base in bases.values():
        wait_ready(base + "/", accept=(200, 404, 405))
    pids = {name: processes.pid_of(name) for name in bases}
    found: dict[str, object] = {}
    if "streams" in parts:
        print(
            f"Timing NDJSON lines of {args.streams} concurrent streams, {args.seconds:g} s "
            "each target:",
            file=sys.stderr,
        )
        rows = {}
        for name, base in bases.items():
            rows[name] = loadgen_json("delay", base, str(args.streams), str(args.seconds))
            print(
                f"  {name:<14} {_ms(rows[name]['p50'])} p50, {_ms(rows[name]['p99'])} p99, "
                f"{rows[name]['lines']:.0f} lines, errors {rows[name]['errors']:.0f}",
                file=sys.stderr,
            )
        found["streams"] = rows
        print()
        print(delay_table(rows, args.streams))
    if "memory" in parts:
        print(f"Holding {args.hold} streams open through each proxy:", file=sys.stderr)
        rows = {}
        for name, base in bases.items():
            if name == "direct":
                continue
            rows[name] = hold_rss(base, args.hold, pids[name])
            print(f"  {name:<14} {rows[name]}", file=sys.stderr)
        found["memory"] = rows
        print()
        print(memory_table(rows, args.hold))
    if "blob" in parts:
        print(f"Uploading {args.blob / 2**20:.0f} MiB through each target:", file=sys.stderr)
        rows = {}
        for name, base in bases.items():
            rows[name] = blob_rss(base, args.blob, pids.get(name) if name != "direct" else None)
            print(f"  {name:<14} {rows[name]}", file=sys.stderr)
        found["blob"] = rows
        print()
        print(blob_table(rows, args.blob))
    return found


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:7.2f} ms"


def loadgen_json(*args: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.streams", *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


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


def hold_rss(base: str, streams: int, pid: int) -> dict[str, float]:
    """Open streams through the proxy at base (slow ones: a line a second), and its RSS."""
    sampler = RSSSampler(pid)
    url = base + "/api/generate?slow"
    command = [sys.executable, "-m", "bench.streams", "hold", url, str(streams), "15"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    opened = int(process.stdout.readline().split()[1])
    time.sleep(1)
    held = sampler.now()
    out, _ = process.communicate()
    baseline, peak = sampler.stop()
    report = json.loads(out.strip().splitlines()[-1])
    return {
        "opened": opened,
        "baseline_mb": baseline / 1e6,
        "held_mb": held / 1e6,
        "peak_mb": peak / 1e6,
        "errors": report["errors"],
    }


def blob_rss(base: str, size: int, pid: int | None) -> dict[str, float]:
    """POST size bytes through base; throughput, and the proxy's RSS growth."""
    sampler = RSSSampler(pid) if pid is not None else None
    report = loadgen_json("blob", base + "/api/blobs/sha256:" + "0" * 64, str(size))
    result = {
        "status": report["status"],
        "seconds": report["seconds"],
        "mib_per_s": size / 2**20 / report["seconds"],
    }
    if sampler is not None:
        baseline, peak = sampler.stop()
        result.update(baseline_mb=baseline / 1e6, growth_mb=(peak - baseline) / 1e6)
    return result


if __name__ == "__main__":
    main()
