"""Where a node's CPU time goes under load (bench.run ``--profile``): py-spy samples it while
a load generator keeps it busy, and each sample is put down to a component."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

from bench.tables import rst_table

# requests/s, p50, p99 and errors of a load generator: (url, concurrency, seconds)
Generate = Callable[[str, int, float], tuple[float, float, float, int]]

# Where a sampled stack's time goes: the first frame from the leaf up whose file is named
# here decides (Deferred and other plumbing frames are passed over).
COMPONENTS = [
    ("access log (twisted.logger, ollana.logs, the log file)",
     ("twisted/logger/", "twisted/python/logfile.py", "twisted/python/log.py",
      "ollana/logs.py", "ollana/access.py")),
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


def profile(
    url: str, pid: int, concurrency: int, seconds: float, generate: Generate, workdir: str
) -> str:
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
    rps, _, _, _ = generate(url, concurrency, seconds + 1)
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
