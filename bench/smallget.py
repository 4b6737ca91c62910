"""bench.run's part "get": a small GET through each target with wrk (or bench.loadgen),
at each concurrency, in ``--rounds`` interleaved rounds; requests/s, p50 and p99, ratios,
the latency each hop adds, and with ``--profile`` where the one-hop node's time goes."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bench import cpuprofile, parts
from bench.harness import ROOT, Processes, wait_ready
from bench.tables import BASE, base_of, ratio, rst_table
from bench.targets import HOPS, Targets, proxies, running, start_nginx


@dataclass
class Result:
    """One measurement: a target at one concurrency (over rounds: the medians)."""

    target: str
    concurrency: int
    rps: float
    p50: float  # seconds
    p99: float  # seconds
    errors: int  # socket errors and non-2xx answers


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


GENERATORS: dict[str, cpuprofile.Generate] = {"wrk": wrk, "builtin": builtin}


# --- the measurement --------------------------------------------------------------------


def measure(
    targets: dict[str, str], concurrencies: list[int], seconds: float, load: str, rounds: int = 1
) -> list[Result]:
    """Every target at every concurrency, target after target, rounds times over (a
    one-second warm-up before each target's first); each row's medians over the rounds."""
    generate = GENERATORS[load]
    found: dict[tuple[str, int], list[Result]] = {}
    width = max(14, *map(len, targets))
    for round in range(1, rounds + 1):
        if rounds > 1:
            print(f" round {round} of {rounds}:", file=sys.stderr, flush=True)
        for name, url in targets.items():
            if round == 1:
                generate(url, max(concurrencies), 1)  # warm-up: connections, caches
            for concurrency in concurrencies:
                rps, p50, p99, errors = generate(url, concurrency, seconds)
                found.setdefault((name, concurrency), []).append(
                    Result(name, concurrency, rps, p50, p99, errors)
                )
                line = (
                    f"  {name:<{width}} c={concurrency:<3} {rps:9.0f} req/s  p50 "
                    f"{p50 * 1e3:7.3f} ms  p99 {p99 * 1e3:7.3f} ms  errors {errors}"
                )
                print(line, file=sys.stderr, flush=True)
    return [median(results) for results in found.values()]


def median(results: list[Result]) -> Result:
    """One row of several rounds: the median of each figure, the errors of all."""
    first = results[0]
    return Result(
        first.target,
        first.concurrency,
        statistics.median(r.rps for r in results),
        statistics.median(r.p50 for r in results),
        statistics.median(r.p99 for r in results),
        sum(r.errors for r in results),
    )


def table(results: list[Result], hops: dict[str, int]) -> str:
    """The small GET's table, with ratios (against the baseline's row too, if there is
    one), and the latency each hop adds."""
    by = {(r.target, r.concurrency): r for r in results}
    baseline = any(r.target.startswith(BASE) for r in results)
    rows = []
    for r in results:
        compared = [by.get((name, r.concurrency)) for name in ("stock", "nginx", "direct")]
        if baseline:
            base = base_of(r.target)
            compared.append(by.get((base, r.concurrency)) if base else None)
        rows.append(
            [
                r.target,
                str(r.concurrency),
                f"{r.rps:.0f}",
                f"{r.p50 * 1e3:.3f}",
                f"{r.p99 * 1e3:.3f}",
                str(r.errors),
                *(ratio(r.rps, b.rps if b else None) for b in compared),
            ]
        )
    header = ["target", "conc", "req/s", "p50 ms", "p99 ms", "errors", "× stock", "× nginx",
              "× direct", *(["× base"] if baseline else [])]  # fmt: skip
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


# --- the part -----------------------------------------------------------------------------


def start(context: parts.Context, processes: Processes) -> Targets:
    """The backend (nginx serving static files, else the simulated Ollama), the targets in
    front of it and the twisted.web reference, once each answers the GET measured."""
    print("Starting the servers for the small GET...", file=sys.stderr)
    if context.nginx is not None:
        backend = start_nginx(processes, context.nginx, "nginx-static", None)
        backend_name = "nginx serving static files"
    else:
        backend = processes.helper("backend")
        backend_name = "Ollana's simulated Ollama"
    bases = proxies(processes, backend, context.nginx, context.baseline)
    bases["twisted.web"] = f"http://127.0.0.1:{processes.helper('constant')}"  # a reference
    for base in bases.values():
        wait_ready(base + context.args.path)
    return Targets(processes, bases, backend_name)


@contextmanager
def servers(context: parts.Context) -> Iterator[Targets]:
    with running(context, "get", lambda processes: start(context, processes)) as targets:
        yield targets


@parts.register(
    "get",
    "a small GET (--path) with wrk at each --concurrency: req/s, p50, p99, ratios",
    servers,
)
def small_get(context: parts.Context, targets: Targets) -> parts.Measured:
    args, load = context.args, context.load
    urls = {name: base + args.path for name, base in targets.bases.items()}
    print(f"Measuring GET {args.path} with {load}, {args.seconds:g} s each:", file=sys.stderr)
    results = measure(urls, args.concurrency, args.seconds, load, args.rounds)
    rounds = f", medians of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    report = (
        f"Small GET: GET {args.path}, backend {targets.backend}, {load} with one thread and "
        f"keep-alive, {args.seconds:g} s per row{rounds}\n\n"
        + table(results, {name: n for name, n in HOPS.items() if name in urls})
    )
    if args.profile:
        one_hop, workdir = targets.pid("ollana 1 hop"), targets.processes.workdir
        report += "\n\n" + cpuprofile.profile(
            urls["ollana 1 hop"], one_hop, max(args.concurrency), args.seconds, GENERATORS[load],
            workdir,
        )  # fmt: skip
    return parts.Measured(results, report)
