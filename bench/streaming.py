"""bench.run's parts "streams", "memory" and "blob", on one set of targets in front of the
streaming backend (``bench.servers streamer``): the delay of NDJSON lines at many streams,
each proxy's RSS with many streams held open, and one big upload. The load comes from
``bench.streams``, in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bench import parts
from bench.harness import ROOT, Processes, RSSSampler, cpu_seconds, wait_ready
from bench.tables import against_base, rst_table
from bench.targets import Targets, proxies, running


def start(context: parts.Context, processes: Processes) -> Targets:
    print("Starting the servers for streaming...", file=sys.stderr)
    backend = processes.helper("streamer", "0.05", "40")  # 20 lines/s, 2 s per stream
    bases = proxies(processes, backend, context.nginx, context.baseline)
    for base in bases.values():
        wait_ready(base + "/", accept=(200, 404, 405))
    return Targets(processes, bases, "bench.servers streamer")


@contextmanager
def servers(context: parts.Context) -> Iterator[Targets]:
    with running(context, "streaming", lambda processes: start(context, processes)) as targets:
        yield targets


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:7.2f} ms"


def loadgen_json(*args: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.streams", *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


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


# --- the tables ---------------------------------------------------------------------------


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
                f"{r['cpu_ms']:.1f}" if "cpu_ms" in r else "-",
                f"{r['errors']:.0f}",
            ]
        )
    header = ["target", "lines", "p50 ms", "p99 ms", "max ms", "added p50", "added p99",
              "CPU ms", "errors"]  # fmt: skip
    title = (
        f"NDJSON streams: {streams} concurrent, 20 lines/s each; delay from the backend's "
        "write to the load generator's read, per line; CPU ms: the proxy's CPU time (both "
        "nodes for two hops) per 1,000 lines; each figure its median over the rounds, "
        "errors their sum"
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


# --- the parts ----------------------------------------------------------------------------


def interleaved(
    context: parts.Context,
    targets: Targets,
    measure: Callable[[str, str], dict[str, float]],
    key: str | None,
) -> dict[str, dict[str, float]]:
    """Each target measured once a round, in --rounds interleaved rounds; for each, the
    round with the median ``key``, or, without a key, each figure's own median over the
    rounds (errors: their sum)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets.bases}
    for number in range(context.args.rounds):
        if context.args.rounds > 1:
            print(f" round {number + 1} of {context.args.rounds}:", file=sys.stderr)
        for name, base in targets.bases.items():
            runs[name].append(measure(name, base))
    if key is not None:
        return {name: sorted(rows, key=lambda row: row[key])[len(rows) // 2]
                for name, rows in runs.items()}  # fmt: skip
    return {name: each_median(rows) for name, rows in runs.items()}


def each_median(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over rows (the upper one of an even count), errors summed."""
    out = {}
    for figure in rows[0]:
        values = sorted(row[figure] for row in rows if figure in row)
        out[figure] = sum(values) if figure == "errors" else values[len(values) // 2]
    return out


@parts.register(
    "streams", "--streams concurrent NDJSON streams: each line's delay, p50/p99/max", servers
)
def streams(context: parts.Context, targets: Targets) -> parts.Measured:
    """Per-chunk delay at many streams."""
    args = context.args
    print(
        f"Timing NDJSON lines of {args.streams} concurrent streams, {args.seconds:g} s "
        "each target:",
        file=sys.stderr,
    )

    def delays(name: str, base: str) -> dict[str, float]:
        path = targets.path(name)
        before = cpu_seconds(path)
        row = loadgen_json("delay", base, str(args.streams), str(args.seconds))
        if path and row["lines"]:
            row["cpu_ms"] = (cpu_seconds(path) - before) * 1e3 / (row["lines"] / 1000)
        print(
            f"  {name:<14} {_ms(row['p50'])} p50, {_ms(row['p99'])} p99, "
            f"{row['lines']:.0f} lines, errors {row['errors']:.0f}"
            + (f", CPU {row['cpu_ms']:.1f} ms per 1,000 lines" if "cpu_ms" in row else ""),
            file=sys.stderr,
        )
        return row

    rows = interleaved(context, targets, delays, None)
    report = delay_table(rows, args.streams)
    figures = {"p50": "p50", "p99": "p99", "cpu_ms": "CPU per line"}
    return parts.Measured(rows, report + against_base(rows, figures))


@parts.register("memory", "--hold slow streams held open: each proxy's RSS, peak", servers)
def memory(context: parts.Context, targets: Targets) -> parts.Measured:
    """RSS with many streams open."""
    args = context.args
    print(f"Holding {args.hold} streams open through each proxy:", file=sys.stderr)
    rows = {}
    for name, base in targets.bases.items():
        if name == "direct":
            continue
        rows[name] = hold_rss(base, args.hold, targets.pid(name))
        print(f"  {name:<14} {rows[name]}", file=sys.stderr)
    report = memory_table(rows, args.hold)
    found = {"baseline_mb": "idle RSS", "held_mb": "RSS held", "peak_mb": "peak RSS"}
    return parts.Measured(rows, report + against_base(rows, found))


@parts.register("blob", "one POST of --blob bytes: time, MiB/s, the proxy's RSS growth", servers)
def blob(context: parts.Context, targets: Targets) -> parts.Measured:
    """A big upload."""
    args = context.args
    print(f"Uploading {args.blob / 2**20:.0f} MiB through each target:", file=sys.stderr)

    def upload(name: str, base: str) -> dict[str, float]:
        row = blob_rss(base, args.blob, targets.pid(name) if name != "direct" else None)
        print(f"  {name:<14} {row}", file=sys.stderr)
        return row

    rows = interleaved(context, targets, upload, "mib_per_s")
    report = blob_table(rows, args.blob)
    return parts.Measured(rows, report + against_base(rows, {"mib_per_s": "MiB/s"}))
