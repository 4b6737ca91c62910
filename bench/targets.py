"""The targets bench.run compares, started in front of one backend: the stock proxy, nginx,
Ollana with one hop and with two, and with ``--baseline`` the same two from another
checkout of Ollana ("ollana@base 1 hop", "ollana@base 2 hops"), each beside its
counterpart so that every round measures them one after the other."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bench import nginx
from bench.harness import Processes, free_port
from bench.parts import Context
from bench.tables import BASE

# What each target's process is called in the run's directory (its output, its log).
PROCESS = {
    "stock": "stock",
    "nginx": "nginx-proxy",
    "ollana 1 hop": "one-hop",
    "ollana 2 hops": "two-hops",
    f"{BASE} 1 hop": "one-hop-base",
    f"{BASE} 2 hops": "two-hops-base",
}
HOPS = {"stock": 1, "nginx": 1, "ollana 1 hop": 1, f"{BASE} 1 hop": 1, "ollana 2 hops": 2,
        f"{BASE} 2 hops": 2}  # fmt: skip


@dataclass
class Targets:
    """The targets started: name -> base URL (direct first), their processes, and what
    the backend is."""

    processes: Processes
    bases: dict[str, str]
    backend: str

    def pid(self, target: str) -> int:
        """The process of a target (for its memory)."""
        return self.processes.named[PROCESS[target]].pid

    def path(self, target: str) -> list[int]:
        """The processes a request to target passes through (two hops: both nodes); none
        for direct."""
        if target == "direct":
            return []
        if HOPS[target] == 2:
            return [self.pid(target), self.pid(target.replace("2 hops", "1 hop"))]
        return [self.pid(target)]


def start_nginx(processes: Processes, binary: str, name: str, backend: int | None) -> int:
    """nginx as a static backend (backend None) or as a proxy to backend; its port."""
    port = free_port()
    if backend is None:
        config = nginx.static_config(processes.workdir, name, port)
    else:
        config = nginx.proxy_config(processes.workdir, name, port, backend)
    processes.command(name, nginx.command(binary, processes.workdir, config))
    return processes.wait_port(name, port)


def ollana_hops(
    processes: Processes, backend: str, suffix: str = "", checkout: str | None = None
) -> tuple[int, int]:
    """A server-mode node in front of backend and a client-mode node in front of that,
    from checkout if given; (one hop's port, two hops' port)."""
    # One load generator address opens up to 1,000 connections at once: above the
    # default per-source limit (256) of a server-mode node.
    processes.twistd(f"one-hop{suffix}", "--mode", "server", "--ollama", backend,
                     "--max-connections", "4000", checkout=checkout)  # fmt: skip
    one = processes.port(f"one-hop{suffix}")
    processes.twistd(f"two-hops{suffix}", "--mode", "client", "--peer", f"127.0.0.1:{one}",
                     checkout=checkout)  # fmt: skip
    return one, processes.port(f"two-hops{suffix}")


def proxies(
    processes: Processes, backend: int, nginx_binary: str | None, baseline: str | None
) -> dict[str, str]:
    """The stock proxy, nginx (if any) and Ollana (one and two hops; and the baseline's, if
    any) in front of backend: name -> base URL, direct first."""
    stock = processes.helper("stock", str(backend), processes.path("stock.log"))
    bases = {"direct": f"http://127.0.0.1:{backend}", "stock": f"http://127.0.0.1:{stock}"}
    if nginx_binary is not None:
        bases["nginx"] = (
            f"http://127.0.0.1:{start_nginx(processes, nginx_binary, 'nginx-proxy', backend)}"
        )
    one, two = ollana_hops(processes, bases["direct"])
    ours = {"ollana 1 hop": one, "ollana 2 hops": two}
    theirs = {}
    if baseline is not None:
        base_one, base_two = ollana_hops(processes, bases["direct"], "-base", baseline)
        theirs = {f"{BASE} 1 hop": base_one, f"{BASE} 2 hops": base_two}
    for hops in ("1 hop", "2 hops"):
        bases[f"ollana {hops}"] = f"http://127.0.0.1:{ours[f'ollana {hops}']}"
        if theirs:
            bases[f"{BASE} {hops}"] = f"http://127.0.0.1:{theirs[f'{BASE} {hops}']}"
    return bases


@contextmanager
def running(
    context: Context, name: str, start: Callable[[Processes], Targets]
) -> Iterator[Targets]:
    """The targets start starts, in the run's directory name, stopped at the end; then
    the errors they logged."""
    with Processes(os.path.join(context.workdir, name)) as processes:
        yield start(processes)
    print(errors_logged(processes.workdir))


def errors_logged(workdir: str) -> str:
    """What the proxies logged as errors under all that load: Python tracebacks (stock,
    Ollana) and nginx's error-level lines."""
    counts = []
    for target, name in (
        ("stock", "stock.out"),
        ("nginx", "nginx-proxy-error.log"),
        ("ollana 1 hop", "one-hop.log"),
        ("ollana 2 hops", "two-hops.log"),
        (f"{BASE} 1 hop", "one-hop-base.log"),
        (f"{BASE} 2 hops", "two-hops-base.log"),
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
