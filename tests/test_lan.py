"""Multi-host tests on a LAN of network namespaces (198.18.0.0/24), with default options.

Here, and only here, Ollana runs with its production defaults: inside a namespace its
broadcasts can reach nothing but the test's own hosts. Needs root and iproute2; skipped
otherwise, unless OLLANA_REQUIRE_NETNS is set (as .ci/run does), when that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import netns
from tests.support.processes import REPO, ChildProcess, python_env

reactor: Any = _reactor
log = Logger()
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
OLLANA = [*TWISTD, "-n", "--pidfile=", "ollana"]
# Short intervals for the client, for speed; every other option keeps its default.
CLIENT_OPTIONS = ["--probe-interval", "1", "--health-interval", "0.5", "--models-interval", "1"]
PACE = "0.1"  # seconds between the fake Ollamas' chunks: a 20-word stream lasts about 2 s


def require_netns(case: TestCase) -> None:
    """Skip without namespaces, or fail when OLLANA_REQUIRE_NETNS says they must run."""
    reason = netns.unavailable()
    if reason is not None:
        if os.environ.get(netns.REQUIRE_ENV):
            case.fail(f"{netns.REQUIRE_ENV} is set but {reason}")
        raise SkipTest(reason)


def spawn(case: TestCase, host: netns.Host, args: list[str]) -> ChildProcess:
    """A Python child in host's namespace, stopped when the test ends."""
    child = ChildProcess.spawn(reactor, args, prefix=host.command())
    case.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
    return child


class LanDiscoveryTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        require_netns(self)
        self.lan = netns.Lan("olt")
        self.addCleanup(self.lan.remove)
        self.server_host = self.lan.add_host()
        self.client_host = self.lan.add_host()

    def spawn(self, host: netns.Host, args: list[str]) -> ChildProcess:
        return spawn(self, host, args)

    async def test_zero_configuration_discovery(self) -> None:
        ollama = self.spawn(
            self.server_host, ["-m", "tests.support.fake_ollama", "--port", "11434"]
        )
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


@dataclass
class Server:
    """A server host: a fake Ollama with its models, and Ollana in auto mode in front."""

    host: netns.Host
    models: list[str]
    ollana: ChildProcess | None = None
    ollama: ChildProcess | None = None
    node: str = ""

    @property
    def peer(self) -> str:
        """How the client's X-Ollana-Peer names this server."""
        return f"{self.host.address}:11435"

    @property
    def url(self) -> str:
        return f"http://{re.escape(self.host.address)}:11435"


class LanProxyTests(TestCase):
    """Two server hosts and a client host, all with Ollana in auto mode and no address given:
    the client's proxy finds both, routes by model, merges listings and survives losing one."""

    timeout = 120

    def setUp(self) -> None:
        require_netns(self)
        self.lan = netns.Lan("olp")
        self.addCleanup(self.lan.remove)
        self.a = Server(self.lan.add_host(), ["alpha:latest", "shared:latest"])
        self.b = Server(self.lan.add_host(), ["beta:latest", "shared:latest"])
        self.client_host = self.lan.add_host()

    async def start(self) -> None:
        """Fake Ollamas, then Ollana on every host; done once the client has found both."""
        for server in (self.a, self.b):
            models = [arg for model in server.models for arg in ("--model", model)]
            fake = ["-m", "tests.support.fake_ollama", "--port", "11434", "--pace", PACE, *models]
            server.ollama = spawn(self, server.host, fake)
        for server in (self.a, self.b):
            assert server.ollama is not None
            await server.ollama.wait_for(r"fake Ollama on http://127\.0\.0\.1:11434")
        for server in (self.a, self.b):
            self.start_ollana(server)
        self.client = spawn(self, self.client_host, [*OLLANA, *CLIENT_OPTIONS])
        for server in (self.a, self.b):
            assert server.ollana is not None
            await server.ollana.wait_for(r"Auto mode: server mode")
            await server.ollana.wait_for(r"Listening for HTTP on 0\.0\.0\.0:11435")
        await self.client.wait_for(r"Auto mode: client mode")
        await self.client.wait_for(r"Listening for HTTP on 127\.0\.0\.1:11434")
        for server in (self.a, self.b):
            found = await self.client.wait_for(rf"Found server (\w+) at {server.url} ")
            server.node = found.group(1)

    def start_ollana(self, server: Server) -> ChildProcess:
        server.ollana = spawn(self, server.host, OLLANA)
        return server.ollana

    async def drive(self, *args: str) -> Any:
        """Run tests.support.lan_driver in the client's namespace; its JSON answer."""
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/env",
            [*self.client_host.command(), sys.executable, "-m", "tests.support.lan_driver", *args],
            env=python_env(),
            path=str(REPO),
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        return json.loads(out)

    async def test_routes_by_model_and_merges_listings(self) -> None:
        """GET /api/tags merges both servers' models; a model goes to the server that has it."""
        await self.start()
        tags = await self.drive("get", "/api/tags")
        self.assertEqual(tags["status"], 200, tags)
        names = sorted(model["name"] for model in tags["body"]["models"])
        self.assertEqual(names, ["alpha:latest", "beta:latest", "shared:latest"])
        self.assertEqual(sorted(tags["peer"].split(", ")), [self.a.peer, self.b.peer])
        for model, server in (("alpha", self.a), ("beta", self.b), ("alpha", self.a)):
            answer = await self.drive("generate", model)
            self.assertEqual((answer["status"], answer["peer"], answer["ok"]),
                             (200, server.peer, True), answer)  # fmt: skip
            self.assertEqual(answer["body"]["model"], model)

    async def test_server_killed_mid_load_then_back(self) -> None:
        """SIGKILL of a server under load: only streams already under way may fail; requests
        it had not answered go to the other, as do new ones; back, it is used again."""
        await self.start()
        load = spawn(self, self.client_host, ["-m", "tests.support.lan_driver", "load", "shared",
                                              "--held", "5", "--streams", "40",
                                              "--every", "0.02", "--after", "30"])  # fmt: skip
        streaming = json.loads((await load.wait_for(r"^streaming (.*)$")).group(1))
        streams = streaming["streams"]
        # The held requests went where the first stream went, nearly all streams with them
        # (the default strategy, fastest, sends all to one server until its checks slow).
        victim, survivor = (
            (self.a, self.b) if streaming["first"] == self.a.peer else (self.b, self.a)
        )
        self.assertGreater(streams.get(victim.peer, 0), 0, streaming)
        assert victim.ollana is not None
        await victim.ollana.kill()
        load.send("killed")
        report = json.loads((await load.wait_for(r"^report (.*)$", timeout=60)).group(1))
        outcomes = report["outcomes"]
        failed = [o for o in outcomes if not o["ok"]]
        cut = [o for o in failed if o["headers"] and o["status"] == 200]
        self.assertEqual([o for o in failed if o not in cut], [], "failed before streaming")
        self.assertEqual({o["peer"] for o in cut}, {victim.peer})
        for phase, count in (("held", 5), ("after", 30)):
            group = [o for o in outcomes if o["phase"] == phase]
            self.assertEqual(len(group), count)
            self.assertEqual([o for o in group if not o["ok"] or o["peer"] != survivor.peer], [])
        retried = [line for line in self.client.lines if f"elsewhere: http://{victim.peer}" in line]
        self.assertGreater(len(retried), 0)  # the held ones, unless a check moved them
        await self.client.wait_for(rf"Server {victim.url} is unhealthy: ")
        log.info(
            "Killed {victim} under load: {total} requests, {streaming} streams on it, {cut} cut "
            "mid-stream, {retried} retried elsewhere (5 held), all 30 started after it fine",
            victim=victim.peer, total=len(outcomes), streaming=streams[victim.peer],
            cut=len(cut), retried=len(retried),
        )  # fmt: skip

        old = victim.node
        self.start_ollana(victim)
        found = await self.client.wait_for(rf"Found server (?!{old})(\w+) at {victim.url} ")
        victim.node = found.group(1)
        own = victim.models[0].partition(":")[0]
        back = await self.drive("until", own, victim.peer, "--within", "15")
        self.assertTrue(back["matched"], back)
        log.info("Back, {peer} answered {model} at try {tries}", peer=victim.peer, model=own,
                 tries=back["tries"])  # fmt: skip

    async def load_until(self, fault: Callable[[Server], Awaitable[object]]) -> None:
        """Streams under load, then fault on the server that carries the first of them:
        no request may fail that had not started streaming, and requests waiting there
        (held ones) and every one started afterwards are served by the other server."""
        await self.start()
        load = spawn(self, self.client_host, ["-m", "tests.support.lan_driver", "load", "shared",
                                              "--held", "5", "--streams", "40",
                                              "--every", "0.02", "--after", "30"])  # fmt: skip
        streaming = json.loads((await load.wait_for(r"^streaming (.*)$")).group(1))
        victim, survivor = (
            (self.a, self.b) if streaming["first"] == self.a.peer else (self.b, self.a)
        )
        await fault(victim)
        load.send("killed")
        report = json.loads((await load.wait_for(r"^report (.*)$", timeout=90)).group(1))
        outcomes = report["outcomes"]
        failed = [o for o in outcomes if not o["ok"]]
        cut = [o for o in failed if o["headers"] and o["status"] == 200]
        self.assertEqual([o for o in failed if o not in cut], [], "failed before streaming")
        self.assertEqual({o["peer"] for o in cut} - {victim.peer}, set())
        for phase, count in (("held", 5), ("after", 30)):
            group = [o for o in outcomes if o["phase"] == phase]
            self.assertEqual(len(group), count)
            self.assertEqual([o for o in group if not o["ok"] or o["peer"] != survivor.peer], [])
        waited = max(o["ended"] - report["killed_at"] for o in outcomes if o["phase"] == "held")
        log.info(
            "Fault under load on {victim}: {total} requests, {cut} cut mid-stream, none failed "
            "before streaming; the held ones done {waited:.1f} s after the fault",
            victim=victim.peer, total=len(outcomes), cut=len(cut), waited=waited,
        )  # fmt: skip

    def freeze(self, child: ChildProcess) -> None:
        """Hang a process (SIGSTOP), as a stuck machine would; it goes on after the test."""
        child.signal(signal.SIGSTOP)
        self.addCleanup(child.signal, signal.SIGCONT)

    async def test_ollama_killed_mid_load(self) -> None:
        """The Ollama behind one server dies: that server's own errors send the requests
        that had not started to the other server at once."""

        async def kill(victim: Server) -> None:
            assert victim.ollama is not None
            await victim.ollama.kill()

        await self.load_until(kill)

    async def test_ollama_hung_mid_load(self) -> None:
        """The Ollama behind one server hangs (SIGSTOP): requests waiting there go to the
        other server once the hang is found, not after the first-byte timeout (300 s)."""

        async def hang(victim: Server) -> None:
            assert victim.ollama is not None
            self.freeze(victim.ollama)

        await self.load_until(hang)

    async def test_server_hung_mid_load(self) -> None:
        """A server itself hangs (SIGSTOP of its Ollana): the client's checks find it, and
        the requests waiting there go to the other server (not after 300 s)."""

        async def hang(victim: Server) -> None:
            assert victim.ollana is not None
            self.freeze(victim.ollana)

        await self.load_until(hang)

    async def test_clean_stop_says_bye(self) -> None:
        """A server stopped with SIGTERM says bye; the client drops it at once, so its model's
        requests go to the other server (which does not have it: 404, as Ollama answers)."""
        await self.start()
        tags = await self.drive("get", "/api/tags")
        self.assertEqual(sorted(tags["peer"].split(", ")), [self.a.peer, self.b.peer])
        assert self.a.ollana is not None
        bye = self.client.wait_for(rf"Server {self.a.node} at {self.a.url} said bye")
        await self.a.ollana.stop()
        self.assertEqual((self.a.ollana.exit_code, self.a.ollana.exit_signal),
                         (None, signal.SIGTERM))  # fmt: skip
        await bye
        answer = await self.drive("generate", "alpha")
        self.assertEqual((answer["status"], answer["peer"]), (404, self.b.peer), answer)
        tags = await self.drive("get", "/api/tags")
        self.assertEqual(tags["peer"], self.b.peer)
        names = sorted(model["name"] for model in tags["body"]["models"])
        self.assertEqual(names, ["beta:latest", "shared:latest"])
        # Dropped, not found failing: no request tried it, no check found it down.
        self.assertNotIn(f"elsewhere: http://{self.a.peer}", self.client.output())
        self.assertNotIn(f"Server http://{self.a.peer} is unhealthy", self.client.output())

    async def test_model_management_with_ollama_python(self) -> None:
        """ollama-python against the client, as against one Ollama: a blob pushed and a
        model created from it, then shown and run; a pull; a copy; a delete of a model both
        servers have, and of one none has (404); the listing says which server has what."""
        await self.start()
        env = {k: v for k, v in python_env().items() if not k.lower().endswith("_proxy")}
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/env",
            [*self.client_host.command(), sys.executable, "-c", OLLAMA_PYTHON],
            env=env,
            path=str(REPO),
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        steps = json.loads(out)
        ok = {"ok": True, "value": "success"}
        for step in ("create", "pull", "copy", "delete"):
            self.assertEqual(steps[step], ok, step)
        self.assertEqual(steps["show"], {"ok": True, "value": "mine:latest"})
        self.assertEqual(steps["generate"], {"ok": True, "value": "hello world"})
        self.assertEqual(steps["show gamma"], {"ok": True, "value": "gamma:latest"})
        self.assertEqual(steps["delete again"]["status"], 404)
        self.assertRegex(
            steps["delete again"]["error"],
            r"^model 'shared' not found \(ollana: "
            r"no server has it; asked 198\.18\.0\.\d+:11435, 198\.18\.0\.\d+:11435\)$",
        )
        tags = await self.drive("get", "/api/tags")
        where = {m["name"]: m["ollana_servers"] for m in tags["body"]["models"]}
        [home] = where["mine:latest"]
        self.assertEqual(where["mine2:latest"], [home])
        self.assertEqual(len(where["gamma:latest"]), 1)
        self.assertEqual(
            (where["alpha:latest"], where["beta:latest"]), ([self.a.peer], [self.b.peer])
        )
        self.assertNotIn("shared:latest", where)


# Run by test_model_management_with_ollama_python in the client's namespace: each step's
# outcome, as JSON.
OLLAMA_PYTHON = """
import json, sys, tempfile
import ollama

client = ollama.Client(host="http://127.0.0.1:11434", timeout=30)
steps = {}


def step(name, call):
    try:
        steps[name] = {"ok": True, "value": call()}
    except ollama.ResponseError as e:
        steps[name] = {"ok": False, "status": e.status_code, "error": e.error}


with tempfile.NamedTemporaryFile(suffix=".gguf") as blob:
    blob.write(b"GGUF, as far as a simulated Ollama can tell")
    blob.flush()
    digest = client.create_blob(blob.name)
step("create", lambda: client.create(model="mine", files={"mine.gguf": digest}).status)
step("show", lambda: client.show("mine") and "mine:latest")
step("generate", lambda: client.generate(model="mine", prompt="hello world").response.strip())
step("pull", lambda: client.pull("gamma").status)
step("show gamma", lambda: client.show("gamma") and "gamma:latest")
step("copy", lambda: client.copy("mine", "mine2").status)
step("delete", lambda: client.delete("shared").status)
step("delete again", lambda: client.delete("shared").status)
json.dump(steps, sys.stdout)
"""
