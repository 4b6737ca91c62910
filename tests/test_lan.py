"""Multi-host tests on a LAN of network namespaces (198.18.0.0/24), with default options.

Here, and only here, Ollana runs with its production defaults: inside a namespace its
broadcasts can reach nothing but the test's own hosts. Needs root and iproute2; skipped
otherwise, unless OLLANA_REQUIRE_NETNS is set (as .ci/run does), when that is a failure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests import netns
from tests.support import REPO, ChildProcess, python_env

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


class LanDiscoveryTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        reason = netns.unavailable()
        if reason is not None:
            if os.environ.get(netns.REQUIRE_ENV):
                self.fail(f"{netns.REQUIRE_ENV} is set but {reason}")
            raise SkipTest(reason)
        self.lan = netns.Lan("olt")
        self.addCleanup(self.lan.remove)
        self.server_host = self.lan.add_host()
        self.client_host = self.lan.add_host()

    def spawn(self, host: netns.Host, args: list[str]) -> ChildProcess:
        child = ChildProcess.spawn(reactor, args, prefix=host.command())
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def test_zero_configuration_discovery(self) -> None:
        ollama = self.spawn(self.server_host, ["-m", "tests.fake_ollama", "--port", "11434"])
        await ollama.wait_for(r"fake Ollama on http://127\.0\.0\.1:11434")
        server = self.spawn(self.server_host, TWISTD + ["-n", "--pidfile=", "ollana"])
        await server.wait_for(r"Auto mode: server mode")
        await server.wait_for(r"Listening for HTTP on 0\.0\.0\.0:11435")

        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/env",
            [*self.client_host.command(), sys.executable, "-m", "ollana", "discover", "--json"],
            env=python_env(),
            path=str(REPO),
        )
        self.assertEqual(code, 0, err)
        [found] = json.loads(out)
        self.assertEqual(
            (found["address"], found["port"], found["legacy"]),
            (self.server_host.address, 11435, False),
        )

        client = self.spawn(self.client_host, TWISTD + ["-n", "--pidfile=", "ollana"])
        await client.wait_for(r"Auto mode: client mode")
        await client.wait_for(r"Listening for HTTP on 127\.0\.0\.1:11434")
        await client.wait_for(rf"Found server {found['node_id']} at http://198\.18\.0\.2:11435 ")
        bye = client.wait_for(rf"Server {found['node_id']} at \S+ said bye")
        await server.stop()
        await bye
