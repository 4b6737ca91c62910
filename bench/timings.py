"""How long users wait: for a client to find a new server, and through a server's death.

Run from the repository's root, with the development virtualenv::

    python -m bench.timings

or as bench.run's part "timings" (registered here). Every node is a twistd process of
its own (bench.harness starts it as it starts bench.run's), listening on 127.0.0.1, with
discovery kept on loopback: broadcasts go to 127.255.255.255 on a UDP port nothing else
uses (``ollana.demo.free_udp_port``), never to the LAN.

- **discovery**: a client-mode node runs (default probe interval, 5 s); a server-mode
  node is started in a new process, and the time is taken from just before its start
  to the first 200 answer to GET /api/version through the client (polled every 10 ms).
  A fresh client and discovery port each run, so that the server is not known already.
- **failover**: a client-mode node and two server-mode nodes in front of the same
  backend, found by discovery (as users run them: no --peer); four threads send
  back-to-back GET /api/version through the client (keep-alive), one server is
  SIGKILLed after 2 s and the load goes on for 5 s, while /ollana/api/status is polled
  every 20 ms.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench import parts
from bench.harness import LISTENING, Processes, get, stop_on_sigterm
from ollana.demo import free_udp_port

TIMEOUT = 20.0  # seconds to wait for a node to find, or see, another
Record = tuple[float, float, int, str]  # a request: start, end, status (0: error), peer


# --- nodes ----------------------------------------------------------------------------


def peer_state(client_port: int, server_port: int) -> dict[str, Any] | None:
    """What the client's /ollana/api/status says of the server at server_port, if known."""
    status, body = get(client_port, "/ollana/api/status")
    if status != 200:
        return None
    peers = json.loads(body)["peers"]
    return next((peer for peer in peers if peer["port"] == server_port), None)


# --- the measurements -------------------------------------------------------------------


def discovery_time(processes: Processes, backend_port: int, runs: int = 3,
                   startup: list[float] | None = None) -> list[float]:  # fmt: skip
    """Seconds from starting a server-mode process to the first 200 to GET /api/version
    through a client-mode node that was already running, one per run. When given,
    startup receives each run's seconds until the server's HTTP listener was up.

    The server announces itself by broadcast as soon as its Ollama answers, so the
    client's probe interval plays no part: nearly all of it is the process's start-up."""
    ollama = f"http://127.0.0.1:{backend_port}"
    times = []
    for run in range(runs):
        discovery = free_udp_port()
        client_name, server_name = f"discovery-client-{run}", f"discovery-server-{run}"
        client = processes.twistd(client_name, "--mode", "client", discovery=discovery)
        client_port = processes.port(client_name)
        time.sleep(0.5)  # running, its first probe sent (unanswered)
        logfile = os.path.join(processes.workdir, f"{server_name}.log")
        started = time.monotonic()
        server = processes.twistd(server_name, "--mode", "server", "--ollama", ollama,
                                  discovery=discovery)  # fmt: skip
        listening: float | None = None
        while True:
            now = time.monotonic()
            if listening is None and os.path.exists(logfile):
                with open(logfile, "rb") as log:
                    listening = now if LISTENING.search(log.read()) else None
            if get(client_port, "/api/version")[0] == 200:
                break
            if server.poll() is not None or now - started > TIMEOUT:
                raise SystemExit(f"the client did not find {server_name} within {TIMEOUT:g} "
                                 f"s; see {processes.workdir}")  # fmt: skip
            time.sleep(0.01)
        found = time.monotonic()
        times.append(found - started)
        if startup is not None:
            startup.append((listening or found) - started)
        up = "-" if listening is None else f"{listening - started:.3f} s"
        print(f"  discovery run {run + 1}: {found - started:.3f} s (listening after {up})",
              file=sys.stderr, flush=True)  # fmt: skip
        processes.stop(server)
        processes.stop(client)
    return times


def _load(port: int, records: list[Record], stop: threading.Event) -> None:
    """Back-to-back GET /api/version on a kept-alive connection until stop is set."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop.is_set():
        start = time.monotonic()
        try:
            connection.request("GET", "/api/version")
            answer = connection.getresponse()
            answer.read()
            status, peer = answer.status, answer.getheader("X-Ollana-Peer", "")
        except (OSError, http.client.HTTPException):
            status, peer = 0, ""
            connection.close()  # the next request connects again
        records.append((start, time.monotonic(), status, peer))
    connection.close()


def failover_time(processes: Processes, backend_port: int, threads: int = 4,
                  before: float = 2.0, after: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """Kill one of a client's two servers under steady load; what the requests saw.

    Times in seconds from the kill, latencies in seconds; "unhealthy_after" is None if
    the status never showed the killed server unhealthy.
    """
    ollama = f"http://127.0.0.1:{backend_port}"
    discovery = free_udp_port()
    client = processes.twistd("failover-client", "--mode", "client", discovery=discovery)
    servers: dict[int, subprocess.Popen[bytes]] = {}
    for name in ("failover-server-a", "failover-server-b"):
        server = processes.twistd(name, "--mode", "server", "--ollama", ollama, discovery=discovery)
        servers[processes.port(name)] = server
    client_port = processes.port("failover-client")
    deadline = time.monotonic() + TIMEOUT
    while not all((peer_state(client_port, port) or {}).get("healthy") for port in servers):
        if time.monotonic() > deadline:
            raise SystemExit(f"the client did not find both servers within {TIMEOUT:g} s; "
                             f"see {processes.workdir}")  # fmt: skip
        time.sleep(0.05)

    records: list[Record] = []
    stop = threading.Event()
    loaders = [threading.Thread(target=_load, args=(client_port, records, stop), daemon=True)
               for _ in range(threads)]  # fmt: skip
    for loader in loaders:
        loader.start()
    time.sleep(before)
    # The server that answered last is the one to kill: it is surely in use.
    answered = [peer for _, _, status, peer in records if status == 200]
    victim = int(answered[-1].rpartition(":")[2]) if answered else next(iter(servers))
    address = f"127.0.0.1:{victim}"
    samples: list[tuple[float, bool, int]] = []  # time, healthy, requests sent to it
    killed = time.monotonic()
    servers[victim].kill()
    while (now := time.monotonic()) < killed + after:
        state = peer_state(client_port, victim)
        if state is not None:
            samples.append((now, bool(state["healthy"]), int(state["total_requests"])))
        else:  # forgotten (or no status): not healthy either
            samples.append((now, False, samples[-1][2] if samples else 0))
        time.sleep(0.02)
    stop.set()
    for loader in loaders:
        loader.join()
    servers[victim].wait()
    processes.stop(client)  # its log is complete once it has stopped
    for server in servers.values():
        processes.stop(server)
    with open(os.path.join(processes.workdir, "failover-client.log"), encoding="utf-8") as log:
        retried = sum("Retrying" in line and address in line for line in log)

    done = sorted(records)
    later = [r for r in done if r[1] >= killed]
    first, sent = (samples[0][2], samples[-1][2]) if samples else (0, 0)
    last_sent = next((t for t, _, total in samples if total == sent), killed) - killed
    last_seen = max((end - killed for _, end, status, peer in later
                     if status != 200 or peer == address), default=0.0)  # fmt: skip
    unhealthy = next((t - killed for t, healthy, _ in samples if not healthy), None)
    # An attempt that fails on the server marks it unhealthy at once, so the retried ones
    # (which the client's log times only to the second) had failed by the time the status
    # said so, give or take the other attempts under way at the kill, which fail with it.
    last_failed = unhealthy if retried and unhealthy is not None else 0.0
    latency_before = [
        end - start for start, end, _, _ in done if killed - 1 <= start and end < killed
    ]
    latency_after = [end - start for start, end, _, _ in later if start < killed + 1]
    return {
        "setup": f"client + 2 servers found by discovery, {threads} threads, kill after "
        f"{before:g} s, {after:g} s more",
        "requests": len(done),
        "requests_after_kill": len(later),
        "failed_before_kill": sum(r[2] != 200 for r in done if r[1] < killed),
        "failed_after_kill": sum(r[2] != 200 for r in later),
        "retried_elsewhere": retried,
        "sent_to_killed_after_kill": sent - first,
        "last_to_killed": max(last_sent, last_seen, last_failed),
        "worst_before": max(latency_before, default=0.0),
        "worst_after": max(latency_after, default=0.0),
        "p50_before": statistics.median(latency_before) if latency_before else 0.0,
        "unhealthy_after": unhealthy,
    }


def report(discovery: list[float], failover: dict[str, Any],
           startup: list[float] | None = None) -> str:  # fmt: skip
    """The figures as a short plain-text block."""
    runs = ", ".join(f"{t:.2f}" for t in discovery)
    lines = [
        "Discovery: new server process -> first 200 through an already running client",
        f"  {runs} s (median {statistics.median(discovery):.2f} s)" if discovery else "  -",
    ]
    if startup:
        lines.append(f"  of which the server's start-up until its HTTP listener is up: "
                     f"median {statistics.median(startup):.2f} s")  # fmt: skip
    f = failover
    unhealthy = f["unhealthy_after"]
    lines += [
        f"Failover: one server SIGKILLed ({f['setup']})",
        f"  requests: {f['requests']} ({f['requests_after_kill']} after the kill); failed: "
        f"{f['failed_before_kill']} before, {f['failed_after_kill']} after the kill",
        f"  killed server: {f['retried_elsewhere']} request(s) failed on it and retried "
        f"elsewhere by the client, {f['sent_to_killed_after_kill']} more sent to it; the last "
        f"by {f['last_to_killed']:.3f} s after the kill (status polled every 20 ms)",
        f"  worst latency: {f['worst_before'] * 1e3:.1f} ms in the second before the kill "
        f"(p50 {f['p50_before'] * 1e3:.1f} ms), {f['worst_after'] * 1e3:.1f} ms in the second "
        "after",
        "  status shows the killed server unhealthy: "
        + ("never" if unhealthy is None else f"{unhealthy:.3f} s after the kill"),
    ]
    return "\n".join(lines)


def measure(processes: Processes) -> dict[str, Any]:
    """Discovery and failover with a simulated Ollama as the servers' backend."""
    backend = processes.helper("backend")
    startup: list[float] = []
    discovery = discovery_time(processes, backend, startup=startup)
    failover = failover_time(processes, backend)
    return {"discovery": discovery, "startup": startup, "failover": failover}


def processes_of(context: parts.Context) -> Processes:
    return Processes(os.path.join(context.workdir, "timings"))


@parts.register(
    "timings", "first answer from a new server by discovery; failover at a SIGKILL", processes_of
)
def timings(context: parts.Context, processes: Processes) -> parts.Measured:
    found = measure(processes)
    return parts.Measured(found, report(found["discovery"], found["failover"], found["startup"]))


def main() -> None:
    stop_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="ollana-timings-")
    try:
        with Processes(workdir) as processes:
            print(f"Timing discovery and failover (logs in {workdir})...", file=sys.stderr)
            found = measure(processes)
        print(report(found["discovery"], found["failover"], found["startup"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
