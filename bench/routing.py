"""Routing (issue 13): what each client-mode strategy does to chat users' time to first
token (TTFT), played by real processes on loopback in wall-clock time. From the
repository's root::

    python -m bench.routing                         # every strategy, 2 seeds: about 5 minutes
    python -m bench.routing --seeds 1 --strategies ttft,round-robin
    python -m bench.routing --seeds 3 --chart docs/routing.svg --json routing.json
    python -m bench.routing --requests              # and every request: where, why, TTFT

The workload (the issue's; ``tests/test_routing_lan.py`` plays it in memory): three
server hosts, each a simulated Ollama (``python -m ollana.simulator``, models m1, m2 and
m3) that keeps one model in memory (``--max-loaded 1``) with two slots
(``--num-parallel 2``), loads a model in 2 s, evaluates an uncached prompt token in 2 ms
and generates a token in 20 ms, behind a server-mode node told those limits
(``--ollama-parallel 2 --ollama-max-loaded 1``); two client-mode nodes that know the three
servers (``--peer``) and not each other; eight users (four on m1, three on m2, one on m3),
alternately on the two clients, each in a 4-turn chat: every turn a streaming
``POST /api/chat`` with the whole conversation so far (a 300-word system prompt of the
user's own, 50-word questions, the answers received), then 1 to 3 s of thinking (seeded),
the first turns spread over the first 2 s. Every node keeps its defaults otherwise
(health checks every 5 s); discovery is off, everything listens on 127.0.0.1.

Each strategy plays on fresh processes (simulators with nothing loaded; bench.harness
starts and stops them), once per seed; every process imports Ollana from a copy of
ollana/ taken when the run starts. bench.run's part "routing" (registered here) plays
every strategy with two seeds.
``--health-interval`` gives every node, whatever the strategy, another interval. Per
request: TTFT (from just before connecting to the first byte of the answer's body),
whether it failed, ``X-Ollana-Route`` and ``X-Ollana-Peer``, and from the final NDJSON line
``prompt_eval_count``, ``prompt_eval_cached_count`` and ``load_duration``. Printed: a
table per strategy over all seeds (mean, median, p90 TTFT, failures, cached share of the
prompt tokens, requests that waited 1 s or more for their model, routes), the mean per
seed, and ttft's mean and median against the better of round-robin and
least-connections (the issue's target: at most 0.5). Exit status 1 when a request
failed or that target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from bench import harness, parts
from bench.harness import ROOT, Processes, code_version, get, post
from bench.tables import rst_table

STRATEGIES = ("ttft", "round-robin", "least-connections", "fastest")
BLIND = ("round-robin", "least-connections")  # the load-blind strategies ttft must beat
MODELS = ("m1", "m2", "m3")
USERS = ("m1",) * 4 + ("m2",) * 3 + ("m3",)  # skewed popularity
SERVERS = 3
CLIENTS = 2
TURNS = 4
THINK = (1.0, 3.0)  # seconds a user reads an answer before the next question
SYSTEM_WORDS = 300
QUESTION_WORDS = 50
PARALLEL = 2
MAX_LOADED = 1
SIMULATOR = [
    "--max-loaded", str(MAX_LOADED), "--num-parallel", str(PARALLEL), "--load-seconds", "2",
    "--prefill-seconds", "0.002", "--token-seconds", "0.02",
]  # fmt: skip
REQUEST_TIMEOUT = 120.0


@dataclass
class Turn:
    """One request of one user, as the app saw it; times in seconds."""

    user: int
    model: str
    client: int
    turn: int
    at: float = 0.0  # sent, from the start of the run
    status: int = 0  # 0: no answer
    error: str = ""  # X-Ollana-Error, or what went wrong here
    route: str = ""  # X-Ollana-Route
    server: int = -1  # which server answered (X-Ollana-Peer), -1: unknown
    ttft: float | None = None
    seconds: float = 0.0
    done: bool = False  # the last NDJSON line said "done": true
    prompt_tokens: int = 0
    cached_tokens: int = 0
    load_duration: float = 0.0  # from arrival to a ready model (queue and load)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error


@dataclass
class Play:
    """One strategy with one seed: every request, and how long the run took."""

    strategy: str
    seed: int
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0


# --- the processes ------------------------------------------------------------------------


def _node(processes: Processes, name: str, *args: str) -> None:
    """``python -m ollana serve`` on 127.0.0.1, discovery off, logging to a file."""
    processes.serve(name, "--drain-timeout", "1", *args)


def lan(processes: Processes, strategy: str, options: list[str]) -> tuple[list[int], list[int]]:
    """Three simulated Ollamas, a server-mode node in front of each and two client-mode
    nodes using strategy (every node with options too), each set started at once;
    (server ports, client ports), once every client sees every server healthy."""
    models = [arg for model in MODELS for arg in ("--model", model)]
    for i in range(SERVERS):
        processes.simulator(f"ollama{i}", *models, *SIMULATOR)
    ollamas = [processes.port(f"ollama{i}") for i in range(SERVERS)]
    limits = ["--ollama-parallel", str(PARALLEL), "--ollama-max-loaded", str(MAX_LOADED)]
    for i, port in enumerate(ollamas):
        _node(processes, f"server{i}", "--mode", "server", "--ollama", f"http://127.0.0.1:{port}",
              *limits, *options)  # fmt: skip
    server_ports = [processes.port(f"server{i}") for i in range(SERVERS)]
    peers = [arg for port in server_ports for arg in ("--peer", f"127.0.0.1:{port}")]
    for i in range(CLIENTS):
        _node(processes, f"client{i}", "--mode", "client", "--strategy", strategy, *peers,
              *options)  # fmt: skip
    client_ports = [processes.port(f"client{i}") for i in range(CLIENTS)]
    for port in client_ports:
        _wait_healthy(port)
    return server_ports, client_ports


def _wait_healthy(client_port: int, timeout: float = 30.0) -> None:
    """Until the client at client_port says every server is healthy."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(client_port, "/ollana/api/status")
        peers = json.loads(body)["peers"] if status == 200 else []
        if sum(bool(peer["healthy"]) for peer in peers) >= SERVERS:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the client on port {client_port} did not see its servers")
        time.sleep(0.05)


# --- the users ------------------------------------------------------------------------------


async def chat(port: int, body: bytes, turn: Turn, servers: dict[str, int]) -> str:
    """One streaming POST /api/chat through the client at port; the answer's text."""
    began = time.monotonic()
    text: list[str] = []
    try:
        await asyncio.wait_for(_chat(port, body, turn, servers, began, text), REQUEST_TIMEOUT)
    except asyncio.TimeoutError:
        turn.error = turn.error or "timeout"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        turn.error = turn.error or type(e).__name__
    turn.seconds = time.monotonic() - began
    return "".join(text)


async def _chat(
    port: int, body: bytes, turn: Turn, servers: dict[str, int], began: float, text: list[str]
) -> None:
    reader, writer, turn.status, headers = await post(port, b"/api/chat", body)
    try:
        turn.error = headers.get("x-ollana-error", "")
        turn.route = headers.get("x-ollana-route", "")
        turn.server = servers.get(headers.get("x-ollana-peer", ""), -1)
        if turn.status != 200:
            return
        data = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            data += (await reader.readexactly(size + 2))[:-2]
            if turn.ttft is None:
                turn.ttft = time.monotonic() - began
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        for line in lines:
            text.append(str((line.get("message") or {}).get("content") or ""))
        final = lines[-1] if lines else {}
        turn.done = final.get("done") is True
        turn.prompt_tokens = int(final.get("prompt_eval_count") or 0)
        turn.cached_tokens = int(final.get("prompt_eval_cached_count") or 0)
        turn.load_duration = int(final.get("load_duration") or 0) / 1e9
    finally:
        writer.close()


async def user(
    n: int, model: str, port: int, seed: int, start: float, servers: dict[str, int],
    turns: list[Turn],
) -> None:  # fmt: skip
    """A user's chat: each turn the whole conversation so far, then thinking."""
    rng = random.Random(seed * 1000 + n)
    system = " ".join(f"s{n}w{i}" for i in range(SYSTEM_WORDS))
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    await asyncio.sleep(rng.uniform(0, THINK[1] - THINK[0]))
    for number in range(TURNS):
        question = " ".join(f"q{number}w{i}" for i in range(QUESTION_WORDS))
        messages.append({"role": "user", "content": question})
        body = json.dumps({"model": model, "messages": messages}).encode()
        turn = Turn(n, model, n % CLIENTS, number, at=time.monotonic() - start)
        turns.append(turn)
        answer = await chat(port, body, turn, servers)
        if turn.ok:
            messages.append({"role": "assistant", "content": answer})
        else:
            messages.pop()  # as an app shows an error: that question is not in the history
        await asyncio.sleep(rng.uniform(*THINK))


async def workload(client_ports: list[int], server_ports: list[int], seed: int) -> list[Turn]:
    """Every user's chat at once; the requests in the order they were sent."""
    servers = {f"127.0.0.1:{port}": i for i, port in enumerate(server_ports)}
    servers.update({f"http://127.0.0.1:{port}": i for i, port in enumerate(server_ports)})
    turns: list[Turn] = []
    start = time.monotonic()
    await asyncio.gather(*(
        user(n, model, client_ports[n % CLIENTS], seed, start, servers, turns)
        for n, model in enumerate(USERS)
    ))  # fmt: skip
    return turns


def snapshot(workdir: str) -> str:
    """A copy of the ollana package and its twistd plugin in workdir: a checkout the
    processes run from (see bench.harness)."""
    source = os.path.join(workdir, "source")
    for tree in ("ollana", os.path.join("twisted", "plugins")):
        shutil.copytree(os.path.join(ROOT, tree), os.path.join(source, tree),
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))  # fmt: skip
    # Compiled now, as the tree's own modules are: not by the nodes, on their first requests.
    compileall.compile_dir(source, quiet=1)
    return source


def play(strategy: str, seed: int, workdir: str, source: str, options: list[str]) -> Play:
    """The workload once, on fresh processes (importing Ollana from source) stopped at the
    end; if they do not all start, what the one that did not said, and once more on fresh
    ones."""
    for attempt in (1, 2):
        where = os.path.join(workdir, f"{strategy}-{seed}-{attempt}")
        with Processes(where, checkout=source) as processes:
            try:
                server_ports, client_ports = lan(processes, strategy, options)
            except SystemExit as failed:  # DidNotStart, or a client not seeing its servers
                if attempt == 2:
                    raise
                print(f"    {failed}:\n{processes.exited()}\n    again", file=sys.stderr)
                continue
            began = time.monotonic()
            turns = asyncio.run(workload(client_ports, server_ports, seed))
            return Play(strategy, seed, turns, time.monotonic() - began)
    raise AssertionError("unreachable")


# --- the figures ----------------------------------------------------------------------------


def _ttfts(turns: list[Turn]) -> list[float]:
    """The TTFT of each request answered whole, shortest first."""
    return sorted(t.ttft for t in turns if t.ok and t.ttft is not None)


def summary(plays: list[Play]) -> dict[str, Any]:
    """One strategy's figures over its plays."""
    turns = [turn for p in plays for turn in p.turns]
    ttfts = _ttfts(turns)
    prompt = sum(t.prompt_tokens for t in turns)
    return {
        "requests": len(turns),
        "failed": sum(not t.ok for t in turns),
        "mean": statistics.mean(ttfts) if ttfts else float("nan"),
        "median": statistics.median(ttfts) if ttfts else float("nan"),
        "p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else float("nan"),
        "cached": sum(t.cached_tokens for t in turns) / prompt if prompt else 0.0,
        "waits": sum(t.load_duration >= 1.0 for t in turns),  # for a load (and an eviction)
        "routes": Counter(t.route or "-" for t in turns),
        "seed_means": [
            statistics.mean(_ttfts(p.turns)) if _ttfts(p.turns) else float("nan") for p in plays
        ],  # fmt: skip
    }


def ratios(figures: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """ttft's mean and median over the better of round-robin and least-connections'."""
    if "ttft" not in figures or not any(name in figures for name in BLIND):
        return None
    blind = [figures[name] for name in BLIND if name in figures]
    return {
        stat: figures["ttft"][stat] / min(f[stat] for f in blind) for stat in ("mean", "median")
    }


def table(figures: dict[str, dict[str, Any]]) -> str:
    """A reStructuredText simple table of every strategy's figures."""
    header = ["strategy", "requests", "failed", "mean s", "median s", "p90 s", "cached",
              "model waits", "routes"]  # fmt: skip
    rows = [
        [name, str(f["requests"]), str(f["failed"]), f"{f['mean']:.2f}", f"{f['median']:.2f}",
         f"{f['p90']:.2f}", f"{f['cached']:.0%}", str(f["waits"]),
         ", ".join(f"{route} {n}" for route, n in f["routes"].most_common())]
        for name, f in figures.items()
    ]  # fmt: skip
    return rst_table(header, rows, left=(0, len(header) - 1))


def report(figures: dict[str, dict[str, Any]], seeds: list[int]) -> str:
    lines = [table(figures), ""]
    for name, f in figures.items():
        means = ", ".join(f"{mean:.2f}" for mean in f["seed_means"])
        lines.append(f"{name}: mean TTFT per seed ({', '.join(map(str, seeds))}): {means} s")
    found = ratios(figures)
    if found is not None:
        failed = figures["ttft"]["failed"]
        met = found["mean"] <= 0.5 and found["median"] <= 0.5 and failed == 0
        lines += [
            "",
            f"ttft against the better of {' and '.join(n for n in BLIND if n in figures)}: "
            f"mean {found['mean']:.2f}×, median {found['median']:.2f}×, {failed} failed "
            f"(target ≤ 0.5×, aim 0.3×, none failed): {'met' if met else 'MISSED'}",
        ]
    return "\n".join(lines)


def per_server(plays: list[Play]) -> str:
    """What each client sent where, and why: for a diagnosis."""
    lines = []
    for p in plays:
        lines.append(f"{p.strategy}, seed {p.seed} ({p.seconds:.0f} s):")
        for turn in sorted(p.turns, key=lambda t: t.at):
            ttft = f"{turn.ttft:5.2f}" if turn.ttft is not None else "  -  "
            lines.append(
                f"  {turn.at:6.2f} user {turn.user} {turn.model} client {turn.client} "
                f"turn {turn.turn} -> server {turn.server} {turn.route:<12} ttft {ttft} "
                f"ready {turn.load_duration:5.2f} cached {turn.cached_tokens:4d}/"
                f"{turn.prompt_tokens:4d}{'' if turn.ok else ' FAILED ' + turn.error}"
            )
    return "\n".join(lines)


COLOURS = {"mean": "#2f6fb3", "median": "#6a9fd4", "p90": "#b0c8e4"}


def svg(figures: dict[str, dict[str, Any]], note: str) -> str:
    """Mean, median and p90 TTFT per strategy as horizontal bars (no plotting library),
    with the issue's target for ttft: half the better load-blind mean."""
    width, row, label = 760, 18, 140
    value = {(name, stat): f[stat] if f[stat] == f[stat] else 0.0  # NaN: nothing answered
             for name, f in figures.items() for stat in COLOURS}  # fmt: skip
    biggest = max(value.values(), default=0) or 1
    span = width - label - 70
    parts = [
        '<text x="10" y="24" font-weight="bold">Chat users\' time to first token, s '
        "(less is better): mean, median, p90</text>"
    ]
    y = 36
    for name in figures:
        parts.append(f'<text x="{label - 6}" y="{y + 2 * row - 4}" text-anchor="end">'
                     f"{escape(name)}</text>")  # fmt: skip
        for stat, colour in COLOURS.items():
            size = max(1.0, span * value[name, stat] / biggest)
            parts.append(
                f'<rect x="{label}" y="{y + 2}" width="{size:.1f}" height="{row - 4}" '
                f'fill="{colour}"/><text x="{label + size + 6:.1f}" y="{y + row - 5}" '
                f'font-size="11">{stat} {value[name, stat]:.2f}</text>'
            )
            y += row
        y += 12
    blind = [value[name, "mean"] for name in BLIND if name in figures]
    if "ttft" in figures and blind:
        x = label + span * 0.5 * min(blind) / biggest
        parts.append(
            f'<line x1="{x:.1f}" y1="32" x2="{x:.1f}" y2="{y - 8}" stroke="#c0392b" '
            f'stroke-dasharray="4 3"/><text x="{x + 4:.1f}" y="{y + 2}" font-size="10" '
            f'fill="#c0392b">target for ttft: half the better load-blind mean</text>'
        )
        y += 8
    parts.append(f'<text x="10" y="{y + 12}" font-size="10" fill="#555">{escape(note)}</text>')
    height = y + 24
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>' + "".join(parts) + "</svg>\n"
    )


# --- the run --------------------------------------------------------------------------------


def measure(
    strategies: list[str], seeds: list[int], workdir: str, options: list[str] | None = None
) -> tuple[dict[str, dict[str, Any]], list[Play]]:
    """Every strategy with every seed, each on fresh processes, every node given options
    too; (figures, plays)."""
    source = snapshot(workdir)
    plays: list[Play] = []
    for strategy in strategies:
        for seed in seeds:
            print(f"  {strategy}, seed {seed}...", file=sys.stderr, flush=True)
            p = play(strategy, seed, workdir, source, options or [])
            plays.append(p)
            done = _ttfts(p.turns)
            print(f"    {len(p.turns)} requests in {p.seconds:.0f} s, mean TTFT "
                  f"{statistics.mean(done) if done else float('nan'):.2f} s, "
                  f"{sum(not t.ok for t in p.turns)} failed", file=sys.stderr)  # fmt: skip
    figures = {s: summary([p for p in plays if p.strategy == s]) for s in strategies}
    return figures, plays


@parts.register(
    "routing",
    "chat users' time to first token, each strategy, two seeds (about 5 min)",
    parts.nothing,
)
def routing(context: parts.Context, _: None) -> parts.Measured:
    """Every strategy, two seeds, in the run's directory."""
    seeds = [1, 2]
    where = os.path.join(context.workdir, "routing")
    figures, _plays = measure(list(STRATEGIES), seeds, where)
    return parts.Measured(figures, report(figures, seeds))


def main(argv: list[str] | None = None) -> int:
    harness.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated [{','.join(STRATEGIES)}]")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=2, help="plays per strategy [2]")
    parser.add_argument("--health-interval", type=float,
                        help="every node's, whatever the strategy [their default: 5]")  # fmt: skip
    parser.add_argument("--chart", help="write the chart (SVG) here")
    parser.add_argument("--json", help="also write every request's figures to this file")
    parser.add_argument("--requests", action="store_true",
                        help="also print every request: when, where, why, its TTFT")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(sorted(unknown))}")
    if args.seeds < 1:
        parser.error("--seeds: at least 1")
    seeds = list(range(1, args.seeds + 1))
    workdir = tempfile.mkdtemp(prefix="ollana-routing-")
    began = time.monotonic()
    machine = harness.machine()
    version = code_version()
    try:
        options = [] if args.health_interval is None else [
            "--health-interval", f"{args.health_interval:g}"]  # fmt: skip
        figures, plays = measure(strategies, seeds, workdir, options)
    finally:
        if args.keep:
            print(f"Logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"Machine: {machine}")
    print(f"Code: {version}")
    print(f"{len(plays)} plays in {time.monotonic() - began:.0f} s\n")
    print(report(figures, seeds))
    if args.requests:
        print()
        print(per_server(plays))
    if args.chart:
        with open(args.chart, "w") as out:
            out.write(svg(figures, machine))
        print(f"\nChart: {args.chart}")
    if args.json:
        dump = {"machine": machine, "code": version, "figures": figures,
                "plays": [asdict(p) for p in plays]}  # fmt: skip
        with open(args.json, "w") as out:
            json.dump(dump, out, indent=1)
    found = ratios(figures)
    failed = any(f["failed"] for f in figures.values())
    return 1 if failed or (found is not None and max(found.values()) > 0.5) else 0


if __name__ == "__main__":
    sys.exit(main())
