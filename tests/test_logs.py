"""JSON log lines, for machines: one object per event, the message and its fields."""

from __future__ import annotations

import io
import json
from typing import Any

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.logger import Logger, LogPublisher
from twisted.python import log as legacy
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from ollana.logs import JSONLines
from tests.support import ChildProcess, free_udp_port

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


class JSONLinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher(JSONLines(self.out))
        self.log = Logger(namespace="ollana.access", observer=self.publisher)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_an_event_with_its_fields(self) -> None:
        self.log.info("{method} {path} {status}", method="GET", path="/api/tags", status=200,
                      peer=None, odd=object())  # fmt: skip
        [record] = self.records()
        self.assertEqual(record["message"], "GET /api/tags 200")
        self.assertEqual((record["level"], record["namespace"]), ("info", "ollana.access"))
        self.assertEqual((record["method"], record["status"], record["peer"]),
                         ("GET", 200, None))  # fmt: skip
        self.assertTrue(record["odd"].startswith("<object object"))
        self.assertTrue(record["time"].endswith("+00:00"))
        self.assertEqual(self.out.getvalue().count("\n"), 1)

    def test_a_failure_has_its_traceback(self) -> None:
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            self.log.failure("Broke")
        [record] = self.records()
        self.assertEqual((record["message"], record["level"]), ("Broke", "critical"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_a_legacy_event(self) -> None:
        publisher = legacy.LogPublisher()
        publisher.addObserver(lambda event: self.publisher(dict(event, log_namespace="x")))
        publisher.msg("Server Shut Down.")
        [record] = self.records()
        self.assertEqual(record["message"], "Server Shut Down.")
        self.assertNotIn("isError", record)


class TwistdJSONLoggerTests(TestCase):
    timeout = 30

    async def test_twistd_logs_json_lines(self) -> None:
        server = ChildProcess.spawn(reactor, [
            *TWISTD, "-n", "--pidfile=", "--logger", "ollana.logs.json_observer", "ollana",
            "--mode", "client", "--no-discovery", "--peer", "127.0.0.1:9",
            "--listen", "tcp:0:interface=127.0.0.1", "--discovery-port", str(free_udp_port()),
        ])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        listening = r'"message": "Listening for HTTP on 127\.0\.0\.1:(\d+)"'
        port = (await server.wait_for(listening)).group(1)
        # An answer means the reactor runs, so twistd's SIGTERM handler is in place.
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port}/ollana/api/status", pool=pool)
        self.assertEqual((await response.json())["mode"], "client")
        await server.stop()
        records = [json.loads(line) for line in server.lines if line.strip()]
        self.assertIn("Server Shut Down.", [record["message"] for record in records])
