"""Faults that should cost nothing (issue 12): hostile upstreams, floods and a dead Ollama,
each played against real Ollana processes on loopback and checked against what is expected.
From the repository's root::

    python -m bench.faults                      # every scenario, about a minute
    python -m bench.faults --only headers,streams
    python -m bench.faults --json faults.json   # every figure too ("-": standard output)

Every node is ``python -m ollana serve --logfile FILE`` (so it logs at the default level,
as installed), listening on 127.0.0.1 on a port it picks, with --no-discovery, or with
discovery broadcast to 127.255.255.255 on a free UDP port. Each scenario's processes are
a ``bench.harness.Processes``, stopped at its end whatever happened. Scenarios (``--only``):

- **headers**: a client-mode node whose one server (--peer, health checked every second)
  answers GET /api/version, and everything else with a status line and header lines
  without end; ``--requests`` (20) POST /api/generate and one GET /api/tags (a merged
  listing) at once through the client. Expected: each a 502 within 1 s; the client's RSS
  (sampled every 20 ms from its start until 3 s after the answers, so its health
  checker's GET /api/tags is in) grows < 50 MB; the client still serving.
- **status**: the same with a status line that never ends.
- **models**: the client's one server lists ``--models`` models (1M: 68 MB of /api/tags),
  health checked every second with its models refreshed, while GET /api/tags is asked of
  the client back to back for 5 s; a thread GETs /ollana/api/status every 5 ms on a
  kept-alive connection and the slowest answer is the longest the client's reactor was
  held. Expected: RSS growth < 50 MB, slowest status answer < 50 ms, every GET /api/tags
  answered (a 502 is an answer: such a listing is over the client's limit).
- **streams**: ``--streams`` (300) NDJSON streams (POST /api/generate, 2 s each) at once
  through one client to one server in front of the simulated Ollama (ollana.simulator):
  more than the client's connections to one server (192) and the server's per-source cap
  (256). Expected: every one whole (200, a line a word, the last ``"done": true``).
- **datagrams**: ``--datagrams`` (10k) junk datagrams (garbage, broken LANA headers,
  probes, announcements and byes of random node ids) to a server's discovery port on
  127.0.0.1: the lines its log gained from the flood's start until a second after it.
  Expected: at most 5.
- **failover**: two servers, each in front of its own simulated Ollama, one client with
  both as --peer, four streams back to back (short answers); after 2 s the Ollama behind
  the server that answered last is SIGKILLed, 4 s more. Expected: no request failed
  without having received a byte of its answer (a non-200, or no answer at all).

Exit status 1 when an expectation fails (or a scenario could not run). The hostile servers
are this module too: ``python -m bench.faults serve endless-headers|endless-status|
many-models [COUNT]`` (asyncio, 127.0.0.1, prints ``port N``; an endless answer stops after
60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.harness import (
    Processes,
    RSSSampler,
    get,
    machine,
    post,
    raise_file_limit,
    stop_on_sigterm,
)
from bench.tables import rst_table
from ollana import wire
from ollana.demo import free_udp_port

HOSTILE_KINDS = ("endless-headers", "endless-status", "many-models")
ENDLESS_FOR = 60.0  # seconds an endless answer goes on, at most
RSS_LIMIT_MB = 50.0  # "tens of MB at most"
STALL_LIMIT_MS = 50.0  # "a few ms", with margins for a small, shared machine
PROMPT_LIMIT_S = 1.0  # the hostile servers' requests answered within
LOG_LINES_LIMIT = 5  # "a handful"


# --- the hostile servers (run in their own process) ---------------------------------------

VERSION_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    b'{"version":"0.12.0"}'
)


def listing(count: int) -> bytes:
    """An /api/tags answer of count models, 68 bytes each (1M: 68 MB, as in issue 12)."""
    entry = b'{"name":"m%07d:latest","model":"m%07d:latest","size":1234567}'
    return b'{"models":[' + b",".join(entry % (i, i) for i in range(count)) + b"]}"


async def hostile(kind: str, count: int) -> None:
    """Serve on 127.0.0.1 until SIGINT or SIGTERM: GET /api/version answered as Ollama
    would (so health checks pass), the rest as kind says."""
    tags = listing(count) if kind == "many-models" else b""
    if kind == "endless-headers":
        start, filler = b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"a" * 54 + b"\r\n"
    else:
        start, filler = b"HTTP/1.1 200 ", b"a" * 64
    loop = asyncio.get_running_loop()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                path = head.split(b" ", 2)[1]
                if path == b"/api/version":
                    writer.write(VERSION_ANSWER)
                elif kind == "many-models":
                    found = path == b"/api/tags"
                    body = tags if found else b'{"error":"not found"}'
                    writer.write(
                        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n"
                        % (b"200 OK" if found else b"404 Not Found", len(body))
                    )
                    for at in range(0, len(body), 1 << 20):
                        writer.write(body[at : at + (1 << 20)])
                        await writer.drain()
                else:
                    writer.write(start)
                    stop = loop.time() + ENDLESS_FOR
                    while loop.time() < stop:
                        writer.write(filler * 1024)
                        await writer.drain()
                    return
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    server.close()


# --- processes ----------------------------------------------------------------------------


def node(processes: Processes, name: str, *args: str, discovery: int = 0) -> int:
    """``python -m ollana serve`` on 127.0.0.1 with discovery off, or on loopback on the
    UDP port discovery; its HTTP port."""
    processes.serve(name, "--drain-timeout", "2", *args, discovery=discovery)
    return processes.port(name)


def helper(processes: Processes, name: str, *argv: str) -> int:
    """A helper server (``-m MODULE ...``) that prints ``port N``; its port."""
    processes.python(name, *argv)
    return processes.port(name)


def simulator(processes: Processes, name: str, pace: float) -> int:
    """The simulated Ollama (model echo), pace seconds between chunks; its port."""
    processes.simulator(name, "--pace", str(pace))
    return processes.port(name)


def server_of(processes: Processes, name: str, ollama: int, discovery: int = 0) -> int:
    """A server-mode node in front of the Ollama on port ollama; its port."""
    url = f"http://127.0.0.1:{ollama}"
    return node(processes, name, "--mode", "server", "--ollama", url, discovery=discovery)


def client_of(processes: Processes, servers: list[int], *args: str) -> int:
    """A client-mode node with these servers as --peer, checked every second; its port."""
    peers = [arg for port in servers for arg in ("--peer", f"127.0.0.1:{port}")]
    return node(processes, "client", "--mode", "client", "--health-interval", "1", *peers, *args)


def wait_healthy(client: int, servers: int) -> None:
    """Until the client at port client sees this many servers healthy."""
    wait_for(lambda: healthy(client) >= servers, "the client to see its servers healthy")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what} ({timeout:g} s)")
        time.sleep(0.05)


def timed_get(port: int, path: str, timeout: float) -> tuple[int, float]:
    """The status of GET path on a new connection, and the seconds it took."""
    began = time.monotonic()
    status, _ = get(port, path, timeout)
    return status, time.monotonic() - began


def healthy(client_port: int) -> int:
    """How many servers the client at client_port says are healthy."""
    status, body = get(client_port, "/ollana/api/status")
    return sum(bool(p["healthy"]) for p in json.loads(body)["peers"]) if status == 200 else 0


# --- requests -----------------------------------------------------------------------------


@dataclass
class Answer:
    """What one POST /api/generate got."""

    status: int = 0  # 0: no answer came
    error: str = ""  # X-Ollana-Error, or what went wrong here
    peer: str = ""  # X-Ollana-Peer
    lines: int = 0
    done: bool = False  # the last NDJSON line said "done": true
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        """Whether it came whole, or how it failed."""
        if self.status == 200 and self.done:
            return "whole"
        if self.status == 0:
            return f"no answer ({self.error})"
        if self.status != 200:
            return f"{self.status} {self.error}".rstrip()
        return f"cut ({self.error or 'no done line'})"

    @property
    def failed_before_a_byte(self) -> bool:
        """Failed without a byte of an answer (a retry elsewhere would have been free)."""
        return self.status != 200


async def generate(port: int, words: int, timeout: float) -> Answer:
    """POST /api/generate of a prompt of words words (echoed back, a chunk each) to port."""
    answer = Answer()
    began = time.monotonic()
    try:
        await asyncio.wait_for(_generate(answer, port, words), timeout)
    except asyncio.TimeoutError:
        answer.error = answer.error or "timeout"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        answer.error = answer.error or type(e).__name__
    answer.seconds = time.monotonic() - began
    return answer


async def _generate(answer: Answer, port: int, words: int) -> None:
    body = json.dumps({"model": "echo", "prompt": " ".join(["word"] * words)}).encode()
    reader, writer, answer.status, headers = await post(port, b"/api/generate", body)
    try:
        answer.error = headers.get("x-ollana-error", "")
        answer.peer = headers.get("x-ollana-peer", "")
        if answer.status != 200:
            return
        if "content-length" in headers:
            lines = (await reader.readexactly(int(headers["content-length"]))).splitlines()
        else:
            lines = await _chunked_lines(reader)
        answer.lines = len(lines)  # a line a word, and the last one
        answer.done = len(lines) == words + 1 and json.loads(lines[-1]).get("done") is True
    finally:
        writer.close()


async def _chunked_lines(reader: asyncio.StreamReader) -> list[bytes]:
    data = b""
    while size := int((await reader.readline()).split(b";")[0], 16):
        data += (await reader.readexactly(size + 2))[:-2]
    return data.splitlines()


# --- measurements -------------------------------------------------------------------------


class StallProbe:
    """GET /ollana/api/status every 5 ms on a kept-alive connection, in a thread: the
    slowest answer is about the longest the node's reactor was held."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seconds: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.wait(0.005):
            began = time.perf_counter()
            try:
                connection.request("GET", "/ollana/api/status")
                connection.getresponse().read()
                self.seconds.append(time.perf_counter() - began)
            except (OSError, http.client.HTTPException):
                self.failures += 1
                connection.close()
        connection.close()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        ms = [s * 1e3 for s in self.seconds] or [0.0]
        return {
            "probes": len(self.seconds),
            "probe_failures": self.failures,
            "p50_ms": statistics.median(ms),
            "max_ms": max(ms),
        }


def log_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return log.read().splitlines()
    except FileNotFoundError:
        return []


def metric(port: int, name: str, label: str) -> float:
    """A value from the node's /ollana/metrics (Prometheus text), or -1."""
    _, text = get(port, "/ollana/metrics")
    found = re.search(rb'^%s\{[^}]*"%s"\}\s+(\S+)' % (name.encode(), label.encode()), text, re.M)
    return float(found.group(1)) if found else -1.0


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class Check:
    """One expectation of a scenario, and how it went."""

    figure: str
    value: str
    expected: str
    ok: bool


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def check(self, figure: str, value: str, expected: str, ok: bool) -> None:
        self.checks.append(Check(figure, value, expected, ok))


def _hostile_upstream(processes: Processes, kind: str, requests: int) -> Outcome:
    """A client whose one server answers with an endless head: what its requests (proxied,
    and one merged listing) get, and what the client's memory and reactor do."""
    server = helper(processes, kind, "-m", "bench.faults", "serve", kind)
    client = client_of(processes, [server])
    rss = RSSSampler(processes.named["client"].pid)  # from before its first check
    wait_healthy(client, 1)
    probe = StallProbe(client)

    async def many() -> tuple[list[Answer], tuple[int, float]]:
        listing = asyncio.to_thread(timed_get, client, "/api/tags", 30)
        answers = await asyncio.gather(*(generate(client, 3, 30) for _ in range(requests)))
        return list(answers), await listing

    answers, (tags_status, tags_seconds) = asyncio.run(many())
    time.sleep(3)  # the health checker's next GET /api/tags meets the endless head too
    stalls = probe.stop()
    baseline, peak = rss.stop()
    growth = (peak - baseline) / 1e6
    kinds = Counter(answer.kind for answer in answers)
    slowest = max(answer.seconds for answer in answers)
    serving = get(client, "/ollana/api/status", timeout=2)[0] == 200
    out = Outcome(
        {
            "answers": dict(kinds),
            "slowest_s": slowest,
            "tags_status": tags_status,
            "tags_s": tags_seconds,
            "rss_baseline_mb": baseline / 1e6,
            "rss_growth_mb": growth,
            "serving_after": serving,
            **stalls,
        }
    )
    out.check(
        "POST /api/generate",
        f"{_counted(kinds)}, slowest {slowest:.3f} s",
        f"{requests} × 502 < {PROMPT_LIMIT_S:g} s",
        slowest < PROMPT_LIMIT_S and all(a.status == 502 for a in answers),
    )
    out.check(
        "GET /api/tags (merged)",
        f"{tags_status} in {tags_seconds:.3f} s",
        f"502 < {PROMPT_LIMIT_S:g} s",
        tags_status == 502 and tags_seconds < PROMPT_LIMIT_S,
    )
    out.check(
        "client RSS growth", f"{growth:.1f} MB", f"< {RSS_LIMIT_MB:g} MB", growth < RSS_LIMIT_MB
    )
    out.check("client serving after", "yes" if serving else "no", "yes", serving)
    return out


def endless_headers(processes: Processes, args: argparse.Namespace) -> Outcome:
    return _hostile_upstream(processes, "endless-headers", args.requests)


def endless_status(processes: Processes, args: argparse.Namespace) -> Outcome:
    return _hostile_upstream(processes, "endless-status", args.requests)


def many_models(processes: Processes, args: argparse.Namespace) -> Outcome:
    """A server listing args.models models: the client's memory and its reactor's stalls
    while its health checker and merged listings read it."""
    server = helper(
        processes, "many-models", "-m", "bench.faults", "serve", "many-models", str(args.models)
    )
    client = client_of(processes, [server], "--models-interval", "1")
    rss = RSSSampler(processes.named["client"].pid)
    wait_healthy(client, 1)
    probe = StallProbe(client)
    statuses: Counter[int] = Counter()
    until = time.monotonic() + 5
    while time.monotonic() < until:
        statuses[get(client, "/api/tags", timeout=15)[0]] += 1
    stalls = probe.stop()
    baseline, peak = rss.stop()
    growth = (peak - baseline) / 1e6
    size = len(listing(args.models))
    out = Outcome(
        {"listing_bytes": size, "tags_answers": dict(statuses), "rss_growth_mb": growth, **stalls}
    )
    out.check(
        f"client RSS growth, {size / 1e6:.0f} MB listed",
        f"{growth:.1f} MB",
        f"< {RSS_LIMIT_MB:g} MB",
        growth < RSS_LIMIT_MB,
    )
    out.check(
        "slowest status answer",
        f"{stalls['max_ms']:.1f} ms (p50 {stalls['p50_ms']:.1f})",
        f"< {STALL_LIMIT_MS:g} ms",
        stalls["max_ms"] < STALL_LIMIT_MS and stalls["probes"] > 0,
    )
    out.check("GET /api/tags (merged)", _counted(statuses), "answered", 0 not in statuses)
    return out


def many_streams(processes: Processes, args: argparse.Namespace) -> Outcome:
    """args.streams streams at once through one client to one server."""
    ollama = simulator(processes, "ollama", 0.05)
    server = server_of(processes, "server", ollama)
    client = client_of(processes, [server])
    wait_healthy(client, 1)

    async def many() -> list[Answer]:
        answers = (generate(client, 40, 60) for _ in range(args.streams))
        return list(await asyncio.gather(*answers))

    began = time.monotonic()
    answers = asyncio.run(many())
    seconds = time.monotonic() - began
    kinds = Counter(answer.kind for answer in answers)
    out = Outcome({"streams": args.streams, "answers": dict(kinds), "seconds": seconds})
    whole = kinds["whole"]
    out.check(
        f"{args.streams} streams whole",
        f"{whole} of {args.streams} in {seconds:.1f} s",
        f"{args.streams}",
        whole == args.streams,
    )
    if whole != args.streams:
        out.check("failures by kind", _counted(kinds - Counter(whole=whole)), "none", False)
    return out


def junk_datagrams(processes: Processes, args: argparse.Namespace) -> Outcome:
    """args.datagrams junk datagrams to a server's discovery port, and its log."""
    ollama = simulator(processes, "ollama", 0)
    discovery = free_udp_port()
    server = server_of(processes, "server", ollama, discovery)
    log = os.path.join(processes.workdir, "server.log")
    wait_for(lambda: any("is up" in line for line in log_lines(log)), "the server's Ollama")
    time.sleep(0.5)  # its start-up lines written
    before = len(log_lines(log))
    junk = random.Random(12)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(args.datagrams):
            sender.sendto(_junk(junk, n), ("127.0.0.1", discovery))
            if n % 100 == 99:
                time.sleep(0.005)  # about as fast as the server reads: few are dropped
    finally:
        sender.close()
    time.sleep(1)
    new = log_lines(log)[before:]
    received = metric(server, "ollana_discovery_packets_total", "received")
    rejected = metric(server, "ollana_discovery_packets_total", "rejected")
    out = Outcome(
        {
            "sent": args.datagrams,
            "received": received,
            "rejected": rejected,
            "log_lines": len(new),
            "lines": new[:20],
        }
    )
    out.check(
        f"log lines, {args.datagrams} sent",
        f"{len(new)} ({received + rejected:.0f} datagrams read)",
        f"≤ {LOG_LINES_LIMIT}",
        len(new) <= LOG_LINES_LIMIT,
    )
    return out


def _junk(rng: random.Random, n: int) -> bytes:
    """Garbage, a broken LANA header, or a probe, announcement or bye of a random node."""
    node_id = rng.randbytes(wire.NODE_ID_SIZE)
    kind = n % 5
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:
        return wire.MAGIC + rng.randbytes(rng.randint(0, 40))
    if kind == 2:
        return wire.encode(wire.Probe(node_id))
    if kind == 3:
        return wire.encode(wire.Announce(node_id, rng.randint(1, 65535), "http", "0.0.1"))
    return wire.encode(wire.Bye(node_id))


def dead_ollama(processes: Processes, args: argparse.Namespace) -> Outcome:
    """Two servers, one client, four streams back to back; one server's Ollama killed."""
    servers: dict[str, str] = {}  # server address -> its Ollama's process name
    for name in ("a", "b"):
        ollama = simulator(processes, f"ollama-{name}", 0.01)
        port = server_of(processes, f"server-{name}", ollama)
        servers[f"127.0.0.1:{port}"] = f"ollama-{name}"
    client = client_of(processes, [int(s.rpartition(":")[2]) for s in servers])
    wait_healthy(client, len(servers))
    answers: list[Answer] = []
    killed: dict[str, float] = {}

    async def load(until: float) -> None:
        while time.monotonic() < until:
            answers.append(await generate(client, 5, 30))

    async def kill_after(seconds: float) -> None:
        await asyncio.sleep(seconds)
        last = next((a.peer for a in reversed(answers) if a.peer in servers), next(iter(servers)))
        processes.named[servers[last]].kill()
        killed[last] = time.monotonic()

    async def scene() -> None:
        until = time.monotonic() + 6
        await asyncio.gather(kill_after(2), *(load(until) for _ in range(4)))

    asyncio.run(scene())
    kinds = Counter(answer.kind for answer in answers)
    before_a_byte = sum(answer.failed_before_a_byte for answer in answers)
    cut = sum(answer.status == 200 and not answer.done for answer in answers)
    out = Outcome(
        {
            "requests": len(answers),
            "answers": dict(kinds),
            "killed": list(killed),
            "failed_before_a_byte": before_a_byte,
            "cut_mid_stream": cut,
        }
    )
    out.check(
        "failed before a byte",
        f"{before_a_byte} of {len(answers)} ({cut} cut mid-stream)",
        "0",
        before_a_byte == 0 and bool(killed),
    )
    return out


def _counted(kinds: Counter[Any]) -> str:
    return ", ".join(f"{n} × {kind}" for kind, n in kinds.most_common()) or "none"


Scenario = Callable[[Processes, argparse.Namespace], Outcome]
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "headers": ("endless upstream headers", endless_headers),
    "status": ("endless status line", endless_status),
    "models": ("a huge /api/tags", many_models),
    "streams": ("streams via 1 client", many_streams),
    "datagrams": ("junk datagrams", junk_datagrams),
    "failover": ("an Ollama killed", dead_ollama),
}


def play(name: str, args: argparse.Namespace, workdir: str) -> Outcome:
    """One scenario in its own processes, stopped at the end; a failed check if it broke."""
    title, scenario = SCENARIOS[name]
    print(f"{title}...", file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        with Processes(os.path.join(workdir, name)) as processes:
            outcome = scenario(processes, args)
    except (Exception, SystemExit) as e:  # SystemExit: the harness's DidNotStart
        outcome = Outcome({"error": str(e)})
        outcome.check("ran", str(e), "to the end", False)
    outcome.figures["scenario_seconds"] = time.monotonic() - began
    return outcome


def table(outcomes: dict[str, Outcome]) -> str:
    """A reStructuredText simple table, left-aligned (bench.run's aligns numbers right)."""
    header = ["scenario", "figure", "measured", "expected", "result"]
    rows = [
        [
            SCENARIOS[name][0] if i == 0 else "",
            c.figure,
            c.value,
            c.expected,
            "ok" if c.ok else "FAILED",
        ]
        for name, outcome in outcomes.items()
        for i, c in enumerate(outcome.checks)
    ]
    return rst_table(header, rows, left=range(len(header)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop_on_sigterm()
    if argv[:1] == ["serve"]:
        if len(argv) < 2 or argv[1] not in HOSTILE_KINDS:
            raise SystemExit(f"serve what? one of {', '.join(HOSTILE_KINDS)}")
        asyncio.run(hostile(argv[1], int(argv[2]) if len(argv) > 2 else 1_000_000))
        return 0
    parser = argparse.ArgumentParser(
        description="Faults that should cost nothing, played against real nodes on loopback."
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"scenarios, comma-separated [{','.join(SCENARIOS)}]",
    )
    parser.add_argument("--requests", type=int, default=20, help="to hostile servers [20]")
    parser.add_argument("--models", type=int, default=1_000_000, help="listed [1000000]")
    parser.add_argument("--streams", type=int, default=300, help="at once [300]")
    parser.add_argument("--datagrams", type=int, default=10_000, help="junk sent [10000]")
    parser.add_argument("--json", help="also write every figure to this file (-: stdout)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    raise_file_limit()  # 300 streams: 600 descriptors here and in the client
    workdir = tempfile.mkdtemp(prefix="ollana-faults-")
    began = time.monotonic()
    try:
        outcomes = {name: play(name, args, workdir) for name in names}
    finally:
        if args.keep:
            print(f"Logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"Machine: {machine()}")
    print(f"{len(names)} scenarios in {time.monotonic() - began:.0f} s\n")
    print(table(outcomes))
    if args.json:
        figures = {name: asdict(outcome) for name, outcome in outcomes.items()}
        text = json.dumps(figures, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as out:
                out.write(text)
    return 0 if all(c.ok for o in outcomes.values() for c in o.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
