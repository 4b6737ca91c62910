"""How fast is Ollana's proxy, next to nginx and Twisted's stock proxy? One run, on
loopback, every server in its own process. From the repository's root::

    python -m bench.run                          # all of it, about 13 minutes
    python -m bench.run --seconds 3              # shorter rows
    python -m bench.run --parts get,streams      # some of it
    python -m bench.run --profile --parts get    # and where the one-hop node's time goes
    python -m bench.run --chart docs/benchmarks.svg --json results.json
    python -m bench.run --parts get --rounds 3 --baseline ../ollana-old   # before/after

Targets, all on 127.0.0.1 with ports picked at start (nothing on the LAN): **direct** (the
backend itself), **stock** (``twisted.web.proxy.ReverseProxyResource``, with Twisted's
access log), **nginx** (a streaming reverse proxy: ``proxy_buffering off``, HTTP/1.1
kept-alive upstream connections, access log; one worker process, as Ollana is one
process), **ollana 1 hop** (server mode in front of the backend) and **ollana 2 hops**
(client mode in front of that, so: client -> server -> backend); and, for the small GET,
**twisted.web** (not a proxy: a twisted.web site answering a constant, the ceiling of
any proxy on twisted.web's server side). Ollana runs under
``twistd -n`` with its access log in a file, as in production.

``--baseline PATH`` (another checkout of Ollana, e.g. ``git worktree add ../ollana-old
COMMIT``) adds **ollana@base 1 hop** and **ollana@base 2 hops**: the same nodes run from
that checkout (its directory first on ``PYTHONPATH`` and the working directory, so that
twistd loads its plugin and its ``ollana``; checked before the run), in front of the same
backend, each measured right after its counterpart from this tree, with ratios against
it (``× base``, and "Against the baseline" lines) in get, streams, memory and blob.

Parts (``--parts``):

- **get**: a small GET (``--path``, default ``/api/version``) with wrk (one thread,
  keep-alive) for ``--seconds`` at each ``--concurrency`` (default 1 and 32), after a
  one-second warm-up; with ``--rounds N``, every target N times over, interleaved, and
  each figure the median of its rounds. The backend is nginx serving static files when
  nginx is installed (else Ollana's simulated Ollama). Prints req/s, p50, p99, ratios
  against stock, nginx and direct, and the p50 latency each hop adds at concurrency 1.
- **streams**: ``--streams`` (200) clients POST /api/generate back to back to a
  streaming backend (``bench.servers streamer``: 20 to 60 NDJSON lines, 20 a second,
  each stamped with the time it was written) and every line's delay is measured at the
  client (``bench.streams``); p50/p99/max, and what each proxy adds to direct's. With
  ``--rounds N``, each target's round with the median p99.
- **memory**: ``--hold`` (1,000) slow streams opened at once and held; the proxy's RSS
  (nginx: master and worker) before, while held, and at its peak (sampled every 20 ms).
- **blob**: one POST of ``--blob`` bytes (1 GiB) to a backend that drops it: time,
  throughput and the proxy's RSS growth. With ``--rounds N``, each target's round with
  the median throughput.
- **timings** (``bench.timings``): from starting a server process to the first answer
  through a client that finds it by loopback broadcast; and a client with two servers
  under steady load, one SIGKILLed: failed requests, how soon no request went to it.
- **routing** (``bench.routing``, about 5 minutes): chat users' time to first token
  through two client nodes and three servers in front of simulated Ollamas, for each
  ``--strategy``, two seeds each; ``python -m bench.routing`` runs it alone, with its
  chart and every request.

After each part, the errors the proxies logged (Python tracebacks; nginx's error lines).
The chart (``--chart``, an SVG) shows the small GET, the streams' p99 and the memory.

This module only reads the options, runs the parts and prints what they report. Each
part registers itself in ``bench.parts`` from its module (``bench.smallget``,
``bench.streaming``, ``bench.timings``, ``bench.routing``); the processes are
``bench.harness``'s, the targets ``bench.targets``'s.

Nothing is installed by this script. wrk (``apt-get install wrk``) is needed for
absolute rates; without it ``bench.loadgen`` (Python, much slower) stands in. nginx
(``apt-get install nginx-light``) is optional: without it its rows are left out.
``--profile`` needs py-spy (``pip install py-spy``) and the right to trace (root). The
machine matters: load generator, proxies and backend share its cores.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import sys
import tempfile

from bench import chart, harness, nginx, parts

# The part modules, in the order their parts run: importing one registers its parts.
PART_MODULES = ("bench.smallget", "bench.streaming", "bench.timings", "bench.routing")
for module in PART_MODULES:
    importlib.import_module(module)


def concurrencies(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def options() -> argparse.ArgumentParser:
    names = ",".join(parts.PARTS)
    width = max(map(len, parts.PARTS))
    listed = "\n".join(f"  {p.name:<{width}}  {p.help}" for p in parts.PARTS.values())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"parts:\n{listed}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=10, help="per measurement [10]")
    parser.add_argument(
        "--concurrency", type=concurrencies, default="1,32", help="comma-separated [1,32]"
    )
    parser.add_argument("--path", default="/api/version", help="the GET measured [/api/version]")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="of the small GET, streams and upload, interleaved; medians [1]",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "builtin"],
        default="auto",
        help="wrk, builtin (Twisted), or auto: wrk if installed",
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    parser.add_argument(
        "--parts", default=names, help=f"what to measure, comma-separated [{names}]"
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams timed [200]")
    parser.add_argument("--hold", type=int, default=1000, help="streams held open for RSS [1000]")
    parser.add_argument(
        "--blob", type=int, default=1 << 30, help="bytes of the blob upload [1 GiB]"
    )
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        help="another checkout of Ollana (e.g. a git worktree of an older commit): adds "
        "ollana@base rows run from it, and ratios against them",
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
    return parser


def main(argv: list[str] | None = None) -> None:
    harness.stop_on_sigterm()
    parser = options()
    args = parser.parse_args(argv)
    names = set(args.parts.split(","))
    unknown = names - set(parts.PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    baseline = None if args.baseline is None else os.path.realpath(args.baseline)
    checked = None if baseline is None else describe(baseline)  # before anything starts

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
    harness.raise_file_limit()

    workdir = tempfile.mkdtemp(prefix="ollana-bench-")
    os.chmod(workdir, 0o755)  # nginx started as root serves as another user: it must enter
    figures: dict[str, object] = {"machine": harness.machine()}
    print(f"Machine: {figures['machine']}")
    if checked is not None:
        figures["code"] = harness.code_version()
        figures["baseline"] = checked
        print(f"Code: {figures['code']}")
        print(f"Baseline: {checked}")
    context = parts.Context(args, workdir, load, nginx_binary, baseline)
    chosen = [part for part in parts.PARTS.values() if part.name in names]
    try:
        # Parts that share a setup, one after the other, share its processes.
        for setup, group in itertools.groupby(chosen, key=lambda part: part.setup):
            with setup(context) as started:
                for part in group:
                    measured = part.measure(context, started)
                    figures[part.name] = measured.figures
                    print()
                    print(measured.report)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(figures, out, indent=1, default=lambda r: r.__dict__)
        if names & {"get", "streams"}:
            with open(args.chart, "w") as out:
                out.write(chart.svg(figures))
            print(f"\nChart: {args.chart}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"Logs: {workdir}", file=sys.stderr)


def describe(baseline: str) -> str:
    """The baseline's commit and the ollana.tap twistd loads from it, once it is sure that
    this is the baseline's (not this tree's)."""
    if not os.path.isfile(os.path.join(baseline, "ollana", "tap.py")):
        raise SystemExit(f"--baseline: {baseline} is not a checkout of Ollana (no ollana/tap.py)")
    origin = harness.ollana_origin(baseline)
    if not origin.startswith(baseline + os.sep):
        raise SystemExit(f"--baseline: twistd would load {origin}, not the baseline's ollana")
    return f"{baseline} at {harness.code_version(baseline)} (twistd loads {origin})"


if __name__ == "__main__":
    main()
