"""How fast is Ollana's proxy? One run on loopback, every server in its own process.

Run from the repository's root, with the development virtualenv::

    python -m bench.run                     # 10 s per measurement, concurrency 1 and 32
    python -m bench.run --seconds 3         # quicker
    python -m bench.run --path /api/tags    # another small GET (merged by a client)
    python -m bench.run --profile           # then profile the one-hop node under load

What it starts (all on 127.0.0.1, ports picked by the system, nothing on the LAN):

- **direct**: the simulated Ollama (``ollana.simulator.FakeOllama``, no pacing, no
  access log), in its own process (``python -m bench.servers backend``);
- **stock**: Twisted's ``twisted.web.proxy.ReverseProxyResource`` in front of it, in its
  own process (``python -m bench.servers stock``);
- **ollana 1 hop**: Ollana in server mode in front of it (``twistd -n --pidfile= ollana
  --mode server --no-discovery --listen tcp:0:interface=127.0.0.1``);
- **ollana 2 hops**: Ollana in client mode (``--mode client --no-discovery --peer`` the
  one-hop node), so a request goes client -> server -> backend.

Then it measures a small GET (``--path``, default ``/api/version``) through each, with wrk
(``wrk --latency``, one thread, keep-alive) for ``--seconds`` at each concurrency
(``--concurrency``, default ``1,32``), after a one-second warm-up, and prints requests/s,
latency p50 and p99, the ratios against the stock proxy and against direct, and at
concurrency 1 the latency each Ollana hop adds (p50 minus direct's p50, per hop).

Mind that in client mode ``GET /api/tags`` (and ``/api/ps``, ``/v1/models``) is not
relayed but answered by the client itself with the merged listing of its servers (it asks
each server for its listing and merges them); ``--path /api/version`` measures the plain
relay through two hops.

wrk is not installed by this script. Without it (``apt-get install wrk`` on Debian and
Ubuntu), it says so and uses ``bench.loadgen``, a small Twisted load generator, whose
figures are much lower (it is Python and shares the CPUs): good for comparing the
targets with each other, not as absolute rates. ``--loadgen builtin`` forces it.

Ollana writes its access lines to a log file in a temporary directory, as it would in
production; the stock proxy does the same with Twisted's own access log. The machine's
core count matters: the load generator, the proxy and the backend share the CPUs.

With ``--profile``, it then starts one more server-mode node under twistd's cProfile
(``twistd --profile FILE --profiler cprofile --savestats``), loads it at the highest
concurrency for ``--seconds``, stops it and prints the 15 functions with the most
cumulative time (also without the reactor's plumbing) and the 15 with the most own
time.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import IO

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
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("OLLANA_SECRET", None)
        env.pop("OLLAMA_HOST", None)
        return env

    def helper(self, *args: str) -> int:
        """Start ``python -m bench.servers ARGS`` and return the port it listens on."""
        out = open(os.path.join(self.workdir, f"{args[0]}.out"), "w+b")  # noqa: SIM115
        command = [sys.executable, "-m", "bench.servers", *args]
        process = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        self.started.append(process)
        return self._port_from(out, re.compile(rb"port (\d+)"), process, args[0])

    def ollana(self, name: str, *args: str, profile: str | None = None) -> int:
        """Start ``twistd -n --pidfile= ollana ARGS`` and return the port it listens on."""
        logfile = os.path.join(self.workdir, f"{name}.log")
        twistd = ["-n", "--pidfile=", f"--logfile={logfile}"]
        if profile is not None:
            twistd += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   *twistd, "ollana", "--listen", "tcp:0:interface=127.0.0.1",
                   "--no-discovery", *args]  # fmt: skip
        out = open(os.path.join(self.workdir, f"{name}.out"), "w+b")  # noqa: SIM115
        process = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        self.started.append(process)
        with open(logfile, "a+b") as log:  # created now if twistd has not yet
            return self._port_from(log, re.compile(LISTENING.pattern.encode()), process, name)

    def _port_from(self, stream: IO[bytes], pattern: re.Pattern[bytes],
                   process: subprocess.Popen[bytes], name: str) -> int:  # fmt: skip
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


def wait_ready(url: str) -> None:
    """Until GET url answers 200 (client mode needs its first health check first)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
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


def measure(targets: dict[str, str], concurrencies: list[int], seconds: float,
            load: str) -> list[Result]:  # fmt: skip
    generate = wrk if load == "wrk" else builtin
    results = []
    for name, url in targets.items():
        generate(url, max(concurrencies), 1)  # warm-up: connections, caches, JIT-less Python
        for concurrency in concurrencies:
            rps, p50, p99, errors = generate(url, concurrency, seconds)
            results.append(Result(name, concurrency, rps, p50, p99, errors))
            line = (f"  {name:<14} c={concurrency:<3} {rps:9.0f} req/s  p50 {p50 * 1e3:7.3f} ms"
                    f"  p99 {p99 * 1e3:7.3f} ms  errors {errors}")  # fmt: skip
            print(line, file=sys.stderr, flush=True)
    return results


def table(results: list[Result], hops: dict[str, int]) -> str:
    """The plain-text table of the results, with ratios and the latency added per hop."""
    by = {(r.target, r.concurrency): r for r in results}
    lines = [
        f"{'target':<14} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'rps/stock':>9} {'rps/direct':>10} {'p50/stock':>9} {'p50/direct':>10}",
    ]
    for r in results:
        stock, direct = by.get(("stock", r.concurrency)), by.get(("direct", r.concurrency))
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
        lines.append(
            f"{r.target:<14} {r.concurrency:>4} {r.rps:>9.0f} {r.p50 * 1e3:>8.3f}"
            f" {r.p99 * 1e3:>8.3f} {r.errors:>6}"
            f" {ratio(r.rps, stock.rps if stock else 0):>9}"
            f" {ratio(r.rps, direct.rps if direct else 0):>10}"
            f" {ratio(r.p50, stock.p50 if stock else 0):>9}"
            f" {ratio(r.p50, direct.p50 if direct else 0):>10}"
        )
    low = min(r.concurrency for r in results)
    direct = by.get(("direct", low))
    if direct is not None:
        lines.append("")
        lines.append(f"Latency added at concurrency {low} (p50 minus direct's p50):")
        for target, count in hops.items():
            row = by.get((target, low))
            if row is not None:
                added = (row.p50 - direct.p50) * 1e3
                lines.append(f"  {target:<14} {added:7.3f} ms in all, {added / count:7.3f} ms "
                             f"per hop ({count} hop{'s' if count > 1 else ''})")  # fmt: skip
    return "\n".join(lines)


def profile(processes: Processes, backend: int, path: str, concurrency: int, seconds: float,
            load: str) -> str:  # fmt: skip
    """Profile a server-mode node under load; the top functions, as text."""
    stats_file = os.path.join(processes.workdir, "one-hop.prof")
    port = processes.ollana("profiled", "--mode", "server", "--ollama",
                            f"http://127.0.0.1:{backend}", profile=stats_file)  # fmt: skip
    url = f"http://127.0.0.1:{port}{path}"
    wait_ready(url)
    rps, p50, p99, errors = (wrk if load == "wrk" else builtin)(url, concurrency, seconds)
    processes.stop(processes.started[-1])
    import io

    text = io.StringIO()
    text.write(f"Profiled one-hop node, c={concurrency}, {seconds:g} s: {rps:.0f} req/s under "
               f"cProfile (p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, errors {errors}); "
               f"stats in {stats_file}\n")  # fmt: skip
    stats = pstats.Stats(stats_file, stream=text)
    stats.strip_dirs().sort_stats("cumulative").print_stats(15)
    # The same without the reactor's own frames (run, doPoll, callWithContext...), which
    # are at the top of every call and hide what the proxy itself spends.
    plumbing = r"^(?!(base|epollreactor|log|context|posixbase|tcp|abstract)\.py:)"
    stats.sort_stats("cumulative").print_stats(plumbing, 15)
    stats.sort_stats("tottime").print_stats(15)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="per measurement [10]")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated [1,32]")
    parser.add_argument("--path", default="/api/version", help="the GET measured [/api/version]")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "builtin"], default="auto",
                        help="wrk, builtin (Twisted), or auto: wrk if installed")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="then profile a one-hop node under load (cProfile)")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory of logs (and profile)")  # fmt: skip
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    load = args.loadgen
    if load != "builtin" and shutil.which("wrk") is None:
        if load == "wrk":
            raise SystemExit("wrk is not installed: apt-get install wrk (Debian, Ubuntu)")
        print("wrk is not installed (apt-get install wrk on Debian and Ubuntu); using the "
              "built-in Twisted load generator, whose figures are much lower.",
              file=sys.stderr)  # fmt: skip
        load = "builtin"
    elif load == "auto":
        load = "wrk"

    workdir = tempfile.mkdtemp(prefix="ollana-bench-")
    processes = Processes(workdir)
    try:
        print(f"Starting the servers (logs in {workdir})...", file=sys.stderr)
        backend = processes.helper("backend")
        stock = processes.helper("stock", str(backend), os.path.join(workdir, "stock.log"))
        backend_url = f"http://127.0.0.1:{backend}"
        one = processes.ollana("one-hop", "--mode", "server", "--ollama", backend_url)
        two = processes.ollana("two-hops", "--mode", "client", "--peer", f"127.0.0.1:{one}")
        targets = {
            "direct": f"http://127.0.0.1:{backend}{args.path}",
            "stock": f"http://127.0.0.1:{stock}{args.path}",
            "ollana 1 hop": f"http://127.0.0.1:{one}{args.path}",
            "ollana 2 hops": f"http://127.0.0.1:{two}{args.path}",
        }
        for url in targets.values():
            wait_ready(url)
        print(f"Measuring GET {args.path} with {load}, {args.seconds:g} s each, "
              f"{os.cpu_count()} CPUs:", file=sys.stderr)  # fmt: skip
        results = measure(targets, concurrencies, args.seconds, load)
        print()
        print(f"GET {args.path}, {load}, {args.seconds:g} s per row, {os.cpu_count()} CPUs")
        print(table(results, {"stock": 1, "ollana 1 hop": 1, "ollana 2 hops": 2}))
        if args.path in ("/api/tags", "/api/ps", "/v1/models"):
            print(f"(In client mode GET {args.path} is the merged listing the client builds "
                  "by asking its servers, not a plain relay.)")  # fmt: skip
        if args.profile:
            print()
            print(profile(processes, backend, args.path, max(concurrencies), args.seconds, load))
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
