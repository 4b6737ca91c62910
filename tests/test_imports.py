"""What a node loads: making and starting a server- or client-mode node imports none of the
packages only some commands or configurations use (prometheus_client at the first scrape,
psutil when discovery looks for broadcast addresses), so an idle node's resident memory
does not carry them. Each check runs in a child Python, whose modules are its own."""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.support.processes import REPO, python_env

# Top-level packages an idle node must not have imported.
LAZY = ("prometheus_client", "psutil", "treq", "hypothesis")

MODES = {
    "server": ["--mode", "server", "--ollama", "http://127.0.0.1:9"],
    "client": ["--mode", "client", "--peer", "127.0.0.1:9"],
}

NODE = """
import json, sys
from twisted.internet.testing import MemoryReactorClock
from ollana.tap import Options, makeService
options = Options()
options.parseOptions([*json.loads(sys.argv[2]), "--no-discovery",
                      "--listen", "tcp:0:interface=127.0.0.1"])
service = makeService(options, reactor=MemoryReactorClock())
service.startService()
assert service.running
"""

REPORT = """
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))))
"""


def imported(code: str, *args: object) -> list[str]:
    """Which of LAZY a child Python has imported once it has run code (given args, as JSON)."""
    result = subprocess.run(
        [sys.executable, "-c", code + REPORT, json.dumps(LAZY), *(json.dumps(a) for a in args)],
        env=python_env(), cwd=str(REPO), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"the child Python failed:\n{result.stderr}")
    found: list[str] = json.loads(result.stdout.splitlines()[-1])
    return found


class IdleNodeImportTests(SynchronousTestCase):
    def test_a_started_node_imports_none_of_them(self) -> None:
        for mode, args in MODES.items():
            self.assertEqual(imported(NODE, args), [], f"{mode} mode")

    def test_scraping_imports_prometheus_client(self) -> None:
        """The metrics page still has its library: the first scrape imports it."""
        scrape = NODE + "list(service.registry.collect())\n"
        self.assertEqual(imported(scrape, MODES["server"]), ["prometheus_client"])

    def test_looking_for_broadcast_addresses_imports_psutil(self) -> None:
        look = "import json, sys\nfrom ollana.netif import default_broadcast_addresses\n"
        self.assertEqual(imported(look + "default_broadcast_addresses()\n"), ["psutil"])
