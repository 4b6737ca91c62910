"""The logs: JSON lines for machines, levels and rotated files, lines written in batches
(the same text as twistd's observer, the time made once a second), the access line (a
client node's checks at debug, streams cut short), and an idle LAN that writes nothing."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import sys
import threading
from datetime import datetime, timezone
from typing import Any

import treq
from twisted.internet import defer, error, task
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from twisted.python import log as legacy
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from ollana import logs
from ollana.logs import (
    FLUSH_CHARS,
    FLUSH_DELAY,
    LOG_LEVEL_ENV,
    LOGFILE_ENV,
    LogLines,
    SecondText,
    json_line,
    json_observer,
    local_time,
    log_observer,
    message,
    text_line,
    text_observer,
    utc_time,
)
from ollana.proxy import ProxySettings
from ollana.site import ProxySite
from ollana.upstream import Router, Upstream, make_agent
from tests.support.fake_ollama import FakeOllama
from tests.support.fakes import capture_logs
from tests.support.processes import ChildProcess, eventually, free_udp_port, read_text

reactor: Any = _reactor
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


class JSONLinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        observer = LogLines(json_line, self.out, LogLevel.debug, Clock())
        self.publisher = LogPublisher(observer)
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

    def test_the_same_line_as_before(self) -> None:
        """Byte for byte what the observer before batching wrote (json.dumps of the record)."""
        lines = [json_line(dict(ACCESS_EVENT, log_time=when))
                 for when in (1700000000.25, 1700000000.0, 1700000000.9999996)]  # fmt: skip
        fields = (
            '"level": "info", "namespace": "ollana.access", "message": "GET / 200", '
            '"status": 200, "cut": null, "duration_ms": 1.5, "odd": "<odd>", '
            '"\\u00fcn\\u00ef": "\\u00e7\\u00f8d\\u00e9"}\n'
        )
        self.assertEqual(lines, [
            '{"time": "2023-11-14T22:13:20.250000+00:00", ' + fields,
            '{"time": "2023-11-14T22:13:20+00:00", ' + fields,
            '{"time": "2023-11-14T22:13:21+00:00", ' + fields,  # rounded up, as datetime does
        ])  # fmt: skip

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


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


# An access line as proxy.access emits it (the keys Logger.emit adds), and a few odd fields.
ACCESS_EVENT: LogEvent = {
    "log_time": 1700000000.25, "log_level": LogLevel.info, "log_namespace": "ollana.access",
    "log_format": "{summary}", "log_logger": None, "log_source": None, "summary": "GET / 200",
    "status": 200, "cut": None, "duration_ms": 1.5, "odd": Odd(), "message": "legacy",
    "ünï": "çødé",
}  # fmt: skip


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
        await server.stop()  # at once: the request's line still waits to be written
        records = [json.loads(line) for line in server.lines if line.strip()]
        messages = [record["message"] for record in records]
        self.assertIn("Server Shut Down.", messages)  # after the reactor stopped
        [access] = [m for m in messages if "GET /ollana/api/status 200 " in m]
        self.assertLess(messages.index(access), messages.index("Server Shut Down."))


class TimeTests(SynchronousTestCase):
    """The time of a line, made once a second: the same text as Twisted's formatTime (text
    lines) and datetime's isoformat (JSON lines)."""

    def times(self) -> list[float]:
        rng = random.Random(15)
        edges = [second + fraction for second in (0, 1_700_000_000, 2_000_000_000.0)
                 for fraction in (0.0, 1e-7, 0.0000005, 0.0000015, 0.5, 0.9999994,
                                  0.9999995, 0.99999949999, 0.9999996, 0.9999999)]  # fmt: skip
        return edges + [rng.uniform(0, 4e9) for _ in range(5000)]

    def test_the_same_text_as_before(self) -> None:
        for when in self.times():
            self.assertEqual(local_time(when), formatTime(when), when)
            self.assertEqual(
                utc_time(when), datetime.fromtimestamp(when, timezone.utc).isoformat(), when
            )
        self.assertEqual(local_time(None), "-")

    def test_made_once_a_second(self) -> None:
        made: list[int] = []

        def make(second: int) -> str:
            made.append(second)
            return formatTime(second)

        self.patch(logs, "_local_second", SecondText(make))
        texts = [local_time(when) for when in (1000.2, 1000.9, 1000.9999996, 1001.3, 1002.0)]
        self.assertEqual(made, [1000, 1001, 1002])  # 1000.9999996 is 1001.000000 to datetime
        self.assertEqual(texts, [formatTime(w) for w in (1000, 1000, 1001, 1001, 1002)])


class MessageTests(SynchronousTestCase):
    """A line's text is Twisted's, for every kind of format (made faster for the usual)."""

    def events(self) -> list[LogEvent]:
        class Thing:
            real = 3
            _x = "private"

            def __format__(self, spec: str) -> str:
                return f"thing:{spec}"

            def __repr__(self) -> str:
                return "<thing>"

        def call() -> str:
            return "called"

        fields = {"x": 1.25, "w": 8, "d": {"k": "v"}, "l": ["first"], "t": Thing(), "f": call,
                  "s": "a\nb", "u": "ünï"}  # fmt: skip
        formats = [
            "{x}", "{x!r} {s!r} {u!a}", "{x:.1f}", "{x:{w}}", "{t.real} {t:spec} {t!r} {t!s}",
            "{d[k]} {l[0]}", "{t._x}", "{t.__class__}", "{t._wrapped}", "{f()}", "{missing}",
            "{0}", "{}", "{", "}", "{{escaped}}", "{x.nope}", "two\nlines {s}", "", b"{x}",
            None, 42,
        ]  # fmt: skip
        events: list[LogEvent] = []
        for n, format in enumerate(formats):
            event = {"log_format": format, "log_time": 1000.5 + n, "log_level": LogLevel.info,
                     "log_namespace": "ollana.test", **fields}  # fmt: skip
            events.append(event)
        events.append(eventFromJSON(eventAsJSON(events[0])))  # a flattened event
        events.append({"log_format": "{x}", "x": 1})  # no time, level or namespace
        events.append({"log_format": "{x}", "x": 1, "log_system": "legacy#x"})
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            events.append({"log_format": "{x}", "x": 1, "log_failure": Failure()})
        return events

    def test_the_same_text_as_twisted(self) -> None:
        for event in self.events():
            self.assertEqual(message(event), formatEvent(event), event.get("log_format"))
            self.assertEqual(text_line(event), formatEventAsClassicLogText(event),
                             event.get("log_format"))  # fmt: skip

    def test_the_fast_way_is_taken(self) -> None:
        """The usual event's text is made without Twisted's formatting (which would be the
        cost this saves)."""
        self.patch(logs, "formatEvent", lambda event: "slow")
        self.patch(logs, "formatEventAsClassicLogText", lambda event, formatTime: "slow")
        self.assertEqual(message(ACCESS_EVENT), "GET / 200")
        line = local_time(ACCESS_EVENT["log_time"]) + " [ollana.access#info] GET / 200\n"
        self.assertEqual(text_line(ACCESS_EVENT), line)
        self.assertEqual(message(dict(ACCESS_EVENT, log_format="{missing}")), "slow")


class WriteCounter(io.StringIO):
    """A stream that counts its writes, and fails them while error is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.error: Exception | None = None

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        self.writes += 1
        return super().write(text)


class LogObserverTests(SynchronousTestCase):
    """What twistd's --logger factories of ollana.logs write: by level, rotated."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def emit(self, observer: Any, level: str, text: str) -> None:
        getattr(Logger(namespace="ollana.test", observer=observer), level)(text)

    def test_debug_only_when_asked_for(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        quiet = log_observer(json_line, {}, self.reactor)
        for level in ("debug", "info", "warn"):
            self.emit(quiet, level, level)
        chatty = log_observer(json_line, {LOG_LEVEL_ENV: "DEBUG "}, self.reactor)
        self.emit(chatty, "debug", "debug, asked for")
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([r["message"] for r in records], ["info", "warn", "debug, asked for"])

    def test_an_unknown_level_is_said_and_info_used(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = log_observer(text_line, {LOG_LEVEL_ENV: "loud"}, self.reactor)
        self.emit(observer, "debug", "not this")
        self.emit(observer, "info", "this")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn(
            "[ollana.logs#warn] $OLLANA_LOG_LEVEL must be one of debug, info, warn, error, "
            "critical, not 'loud': logging at info",
            lines[0],
        )
        self.assertTrue(lines[1].endswith("[ollana.test#info] this"))

    def test_events_without_a_level_or_namespace_are_left_out(self) -> None:
        out = io.StringIO()
        observer = LogLines(text_line, out, LogLevel.debug, Clock())
        observer({"log_format": "no level", "log_namespace": "x", "log_time": 1.0})
        observer({"log_format": "no namespace", "log_level": LogLevel.critical})
        observer({"log_format": "", "log_level": LogLevel.info, "log_namespace": "x"})
        self.assertEqual(out.getvalue(), "")

    def test_the_file_rotates_with_a_few_old_ones_kept(self) -> None:
        self.patch(logs, "ROTATE_BYTES", 2000)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "ollana.log")
        observer = log_observer(text_line, {LOGFILE_ENV: path}, self.reactor)
        self.reactor.run()  # in batches from now on
        for n in range(1000):
            self.emit(observer, "info", f"line {n:04} " + "x" * 80)
        self.reactor.advance(FLUSH_DELAY)
        self.assertEqual(
            sorted(os.listdir(directory)), ["ollana.log", *(f"ollana.log.{n}" for n in range(1, 6))]
        )
        with open(path) as f:
            self.assertIn("line 0999", f.read())
        with open(path + ".1") as f:
            self.assertNotIn("line 0999", f.read())

    def test_batches_rotate_where_lines_one_by_one_would(self) -> None:
        """Each file ends with the line that reached 2000 characters, as when each line
        was written on its own: a batch is no reason for a bigger file."""
        self.patch(logs, "ROTATE_BYTES", 2000)
        files = []
        for batches in (False, True):
            directory = self.mktemp()
            os.makedirs(directory)
            reactor = MemoryReactorClock()
            observer = log_observer(text_line, {LOGFILE_ENV: os.path.join(directory, "o.log")},
                                    reactor)  # fmt: skip
            if batches:
                reactor.run()
            for n in range(200):
                observer(dict(ACCESS_EVENT, summary=f"line {n} " + "x" * (n % 50)))
            reactor.advance(FLUSH_DELAY)
            files.append({name: read_text(os.path.join(directory, name))
                          for name in os.listdir(directory)})  # fmt: skip
        one_by_one, batched = files
        self.assertEqual(batched, one_by_one)
        self.assertEqual(len(batched), 6)
        for text in batched.values():
            self.assertLess(len(text) - len(text.splitlines(keepends=True)[-1]), 2000)

    def test_a_factory_for_twistd_of_each_format(self) -> None:
        for factory, format in ((text_observer, text_line), (json_observer, json_line)):
            reactor = MemoryReactorClock()
            observer = factory(reactor)
            self.assertTrue(ILogObserver.providedBy(observer))
            self.assertIs(observer.format, format)
            self.assertEqual(len(reactor.whenRunningHooks), 1)
            self.assertEqual(len(reactor.triggers["before"]["shutdown"]), 1)


class BatchTests(SynchronousTestCase):
    """While the reactor runs, lines wait and are written together: after FLUSH_DELAY,
    once FLUSH_CHARS wait, with an error, and when the reactor begins to stop; the same
    text as twistd's own observer writes."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.out = WriteCounter()
        self.patch(sys, "stdout", self.out)
        self.observer = log_observer(text_line, {}, self.reactor)
        self.before = io.StringIO()  # what twistd's observer writes
        publisher = LogPublisher(self.observer, textFileLogObserver(self.before))
        self.log = Logger(namespace="ollana.access", observer=publisher)

    def written(self) -> str:
        text = self.out.getvalue()
        self.assertEqual(text, self.before.getvalue())
        return text

    def test_at_once_before_the_reactor_runs(self) -> None:
        self.log.info("starting")
        self.log.info("listening")
        self.assertEqual(self.written().count("\n"), 2)
        self.assertEqual((self.out.writes, self.reactor.getDelayedCalls()), (2, []))

    def test_lines_wait_for_the_timer(self) -> None:
        self.reactor.run()
        for n in range(3):
            self.log.info("GET /api/tags 200 {n}", n=n)
        self.assertEqual(self.out.getvalue(), "")
        self.reactor.advance(FLUSH_DELAY - 0.01)
        self.assertEqual(self.out.getvalue(), "")
        self.reactor.advance(0.01)
        self.assertEqual(self.written().count("\n"), 3)
        self.assertEqual((self.out.writes, self.reactor.getDelayedCalls()), (1, []))
        self.log.info("later")
        self.reactor.advance(FLUSH_DELAY)
        self.assertEqual((self.written().count("\n"), self.out.writes), (4, 2))

    def test_a_full_batch_is_written_at_once(self) -> None:
        self.reactor.run()
        line = "x" * 1000
        for _ in range(FLUSH_CHARS // 1050):
            self.log.info(line)
        self.assertEqual(self.out.getvalue(), "")
        self.log.info(line)
        self.assertEqual(self.written().count("\n"), FLUSH_CHARS // 1050 + 1)
        self.assertEqual((self.out.writes, self.reactor.getDelayedCalls()), (1, []))

    def test_an_error_is_written_at_once_with_what_waits(self) -> None:
        self.reactor.run()
        self.log.info("asked")
        self.log.warn("odd")
        self.assertEqual(self.out.getvalue(), "")
        self.log.error("broke")
        self.assertEqual(self.written().count("\n"), 3)
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            self.log.failure("crashed")
        self.assertIn("ZeroDivisionError", self.written())
        self.assertEqual((self.out.writes, self.reactor.getDelayedCalls()), (2, []))

    def test_all_is_written_when_the_reactor_begins_to_stop(self) -> None:
        self.reactor.run()
        self.log.info("asked")
        [(stopping, args, kwargs)] = self.reactor.triggers["before"]["shutdown"]
        stopping(*args, **kwargs)  # as the reactor does on SIGTERM
        self.assertEqual(self.written().count("\n"), 1)
        self.log.info("Server Shut Down.")  # twistd's last line, once the reactor stopped
        self.assertEqual(self.written().count("\n"), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_another_thread_writes_at_once(self) -> None:
        """Not touching the reactor's timers, which are not for other threads."""
        self.reactor.run()
        thread = threading.Thread(target=self.log.info, args=("from a thread",))
        thread.start()
        thread.join()
        self.assertEqual(self.written().count("\n"), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class WriteFailureTests(SynchronousTestCase):
    """A log that cannot be written (a full disk, a closed stream) loses lines, not the
    reactor or the caller; the next line written says how many, and why."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.out = WriteCounter()
        self.observer = LogLines(text_line, self.out, LogLevel.info, self.clock)
        self.log = Logger(namespace="ollana.access", observer=self.observer)

    def test_lines_are_lost_and_counted(self) -> None:
        self.observer.start_batching()
        self.out.error = OSError(errno.ENOSPC, "No space left on device")
        self.log.info("one")
        self.log.info("two")
        self.clock.advance(FLUSH_DELAY)  # raises nothing into the reactor
        self.assertEqual(self.clock.getDelayedCalls(), [])  # and does not try again
        self.log.error("three")  # raises nothing into the logging system
        self.out.error = None
        self.log.info("four")
        self.assertEqual(self.out.getvalue(), "")
        self.clock.advance(FLUSH_DELAY)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].endswith(
            "[ollana.logs#warn] 3 log lines could not be written "
            "([Errno 28] No space left on device) and are lost"
        ), lines[0])  # fmt: skip
        self.assertTrue(lines[1].endswith("[ollana.access#info] four"))
        self.log.info("five")
        self.clock.advance(FLUSH_DELAY)
        self.assertNotIn("lost", self.out.getvalue().splitlines()[-1])

    def test_a_closed_stream_when_not_batching(self) -> None:
        self.out.close()
        self.log.info("one")
        self.log.critical("two")
        self.observer.out = io.StringIO()
        self.log.info("three")
        lines = self.observer.out.getvalue().splitlines()
        self.assertIn(" 2 log lines could not be written (I/O operation on closed file", lines[0])
        self.assertEqual(len(lines), 2)


class TwistdTextLoggerTests(TestCase):
    timeout = 30

    async def test_junk_datagrams_are_one_line_and_debug_is_left_out(self) -> None:
        directory = os.path.abspath(self.mktemp())  # the child runs elsewhere
        os.makedirs(directory)
        path = os.path.join(directory, "ollana.log")
        discovery = free_udp_port()
        server = ChildProcess.spawn(reactor, [
            *TWISTD, "-n", "--pidfile=", "--logger", "ollana.logs.text_observer", "ollana",
            "--mode", "client", "--peer", "127.0.0.1:9", "--broadcast", "127.255.255.255",
            "--listen", "tcp:0:interface=127.0.0.1", "--discovery-port", str(discovery),
        ], prefix=["env", f"{LOGFILE_ENV}={path}"])  # fmt: skip
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        await eventually(reactor, lambda: "Listening for HTTP" in read_text(path))
        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        for n in range(500):  # loopback only
            sender.write(b"junk %d" % n, ("127.0.0.1", discovery))
        await task.deferLater(reactor, 0.5)
        await server.stop()
        text = read_text(path)
        self.assertIn("Open files:", text)
        self.assertRegex(
            text, r"Ignored \d+ datagrams from 1 host in the last \d+ s: \d+ malformed"
        )
        self.assertNotIn("#debug]", text)
        self.assertLess(len(text.splitlines()), 40)


CLIENT = IPv4Address("TCP", "198.18.0.50", 40000)
SERVER = Upstream("http://127.0.0.1:11434", peer="198.18.0.2:11435")


class Proxied:
    """A proxy site in memory, all to SERVER: one client connection, and the upstream
    connection its request opens."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        proxy = ProxySettings(make_agent(self.reactor, connect_timeout=5), Router(SERVER),
                              self.reactor)  # fmt: skip
        self.channel = ProxySite(proxy).buildProtocol(CLIENT)
        self.client = StringTransport(peerAddress=CLIENT)
        self.channel.makeConnection(self.client)
        self.upstream: Any = None  # the upstream side of the connection a request opens

    def ask(self, head: bytes) -> None:
        """Send a request, and accept its upstream connection."""
        self.channel.dataReceived(head)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.upstream.makeConnection(StringTransport())

    def answer(self, data: bytes) -> None:
        self.upstream.dataReceived(data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"


class AccessLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = Proxied()
        self.logged = capture_logs(self)

    def line(self) -> dict[str, Any]:
        [event] = [e for e in self.logged if e.get("log_namespace") == "ollana.access"]
        return event

    def test_a_client_nodes_check_is_debug(self) -> None:
        self.proxy.ask(b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Ollana-Check: health\r\n\r\n")
        self.proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.line()["log_level"], LogLevel.debug)

    def test_other_requests_are_info(self) -> None:
        for head in (
            b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n",  # an app's
            b"GET /api/ps HTTP/1.1\r\nHost: x\r\nX-Ollana-Check: health\r\n\r\n",
        ):
            proxy = Proxied()
            proxy.ask(head)
            proxy.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        levels = [e["log_level"] for e in self.logged if e.get("log_namespace") == "ollana.access"]
        self.assertEqual(levels, [LogLevel.info, LogLevel.info])

    def test_a_whole_stream_is_not_cut(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD + b"0\r\n\r\n")
        line = self.line()
        self.assertIsNone(line["cut"])
        self.assertTrue(line["summary"].endswith(" B"), line["summary"])

    def test_a_stream_cut_by_the_client(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD)
        self.proxy.channel.connectionLost(Failure(error.ConnectionLost()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (200, "client"))
        self.assertTrue(line["summary"].endswith(" B cut by client"), line["summary"])

    def test_a_stream_cut_by_the_upstream(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.answer(STREAM_HEAD)
        self.proxy.upstream.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(self.proxy.client.disconnecting, "the client's connection is cut")
        self.proxy.channel.connectionLost(Failure(error.ConnectionAborted()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (200, "upstream"))
        self.assertTrue(line["summary"].endswith(" B cut by upstream"), line["summary"])

    def test_a_client_gone_before_the_answer_is_499_not_cut(self) -> None:
        self.proxy.ask(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.proxy.channel.connectionLost(Failure(error.ConnectionLost()))
        line = self.line()
        self.assertEqual((line["status"], line["cut"]), (499, None))


class IdleLANTests(TestCase):
    """One server and two clients on loopback, as ollana serve runs them: once started,
    nothing is logged at the default level while they only check on each other."""

    timeout = 90
    QUIET = 10.0  # seconds watched; with checks every second, as many as a minute at 5 s

    def node(self, *args: str) -> ChildProcess:
        child = ChildProcess.spawn(reactor, ["-m", "ollana", "serve", *self.lan, *args])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def served(self, url: str) -> float:
        """Requests the server has proxied so far (its metrics)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url + "/ollana/metrics", pool=pool)
        text = (await response.content()).decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ollana_requests_total{"))  # fmt: skip

    async def test_nothing_is_logged_while_idle(self) -> None:
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        ollama = reactor.listenTCP(0, fake.site(access_log=False), interface="127.0.0.1")
        self.addCleanup(ollama.stopListening)
        self.lan = ["--broadcast", "127.255.255.255", "--discovery-port", str(free_udp_port()),
                    "--listen", "tcp:0:interface=127.0.0.1", "--health-interval", "1"]  # fmt: skip
        server = self.node("--mode", "server",
                           "--ollama", f"http://127.0.0.1:{ollama.getHost().port}")  # fmt: skip
        listening = await server.wait_for(r"Listening for HTTP on 127\.0\.0\.1:(\d+)")
        url = f"http://127.0.0.1:{listening.group(1)}"
        clients = [self.node("--mode", "client", "--probe-interval", "1",
                             "--models-interval", "1") for _ in range(2)]  # fmt: skip
        for client in clients:
            await client.wait_for(f"Found server .* at {url} ")
        await task.deferLater(reactor, 1.5)  # the first checks, and their first model lists
        before = await self.served(url)
        await server.wait_for(r"GET /ollana/metrics ")  # that request's own line
        nodes = [server, *clients]
        counts = [len(node.lines) for node in nodes]
        await task.deferLater(reactor, self.QUIET)
        new = [line for node, count in zip(nodes, counts, strict=True)
               for line in node.lines[count:]]  # fmt: skip
        self.assertEqual(new, [])
        checks = await self.served(url) - before
        self.assertGreater(checks, 2 * self.QUIET, "the clients checked all along")
