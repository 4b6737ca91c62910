"""Child processes and real sockets for the loopback and namespace tests: this checkout's
environment for a child Python, a child whose output lines a test waits for, free ports,
waiting for a condition with a deadline."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol

from ollana.demo import free_udp_port as free_udp_port  # the demo's own, for tests too

REPO = Path(__file__).resolve().parent.parent.parent


def python_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's ollana and plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("OLLAMA_HOST", None)
    return env


class ChildProcess(ProcessProtocol):
    """A child process whose output lines a test can wait for, with a deadline."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.lines: list[str] = []
        self._buffer = b""
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred[re.Match[str]]]] = []
        self._end_waiters: list[defer.Deferred[int | None]] = []
        self.has_ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    @classmethod
    def spawn(cls, reactor: Any, args: list[str], prefix: Sequence[str] = ()) -> ChildProcess:
        """Run ``PREFIX... python ARGS...`` with this checkout importable.

        The prefix runs the child elsewhere, as ``ip netns exec NAME`` does.
        """
        child = cls(reactor)
        argv = [*prefix, sys.executable, *args]
        executable = shutil.which(argv[0]) or argv[0]
        reactor.spawnProcess(child, executable, argv, env=python_env(), path=str(REPO))
        return child

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for waiter in list(self._waiters):
                match = waiter[0].search(line)
                if match:
                    self._waiters.remove(waiter)
                    waiter[1].callback(match)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if self._buffer:
            self.outReceived(b"\n")
        self.has_ended = True
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(AssertionError("the process ended; its output:\n" + self.output()))
        ended, self._end_waiters = self._end_waiters, []
        for waiting in ended:
            waiting.callback(self.exit_code)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 20) -> defer.Deferred[re.Match[str]]:
        """Fires with the match of the first output line matching pattern."""
        for line in self.lines:
            match = re.search(pattern, line)
            if match:
                return defer.succeed(match)
        if self.has_ended:
            return defer.fail(AssertionError(f"no {pattern!r} in:\n" + self.output()))
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        self._waiters.append((re.compile(pattern), d))
        return d.addTimeout(timeout, self._reactor)

    def when_ended(self) -> defer.Deferred[int | None]:
        """Fires with the exit code (None when killed by a signal)."""
        if self.has_ended:
            return defer.succeed(self.exit_code)
        d: defer.Deferred[int | None] = defer.Deferred()
        self._end_waiters.append(d)
        return d

    def signal(self, name: str | int) -> None:
        if not self.has_ended and self.transport is not None:
            self.transport.signalProcess(name)

    async def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, SIGKILL if it has not ended after timeout seconds; the exit code.

        twistd stopped by a signal ends by that signal, so a clean stop gives None.
        """
        if not self.has_ended:
            self.signal("TERM")
            kill = self._reactor.callLater(timeout, self.signal, "KILL")
            await self.when_ended()
            if kill.active():
                kill.cancel()
        return self.exit_code

    async def kill(self) -> int | None:
        """SIGKILL, as a crash would; returns once it has ended."""
        self.signal("KILL")
        return await self.when_ended()

    def send(self, line: str) -> None:
        """Write a line to the child's standard input."""
        if not self.has_ended and self.transport is not None:
            self.transport.write(line.encode("utf-8") + b"\n")


def free_tcp_port() -> int:
    """A TCP port on loopback that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    reactor: Any, condition: Any, deadline: float = 20, step: float = 0.1, what: str = ""
) -> None:
    """Wait until condition() holds, checking every step seconds, failing after deadline."""
    for _ in range(int(deadline / step)):
        if condition():
            return
        await task.deferLater(reactor, step)
    raise AssertionError(f"timed out waiting for {what or 'the condition'} ({deadline} s)")


def read_text(path: str) -> str:
    """A file's text, or "" while it does not exist (a log not written yet)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def kill_quietly(pid: int) -> None:
    """SIGKILL pid if it still runs (a test's clean-up after a daemon)."""
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def accepted_connections_closed(reactor: Any, port: int, deadline: float = 5) -> None:
    """Wait until every connection accepted on this TCP port has gone (a test's clean-up)."""
    from twisted.internet import tcp

    def closed() -> bool:
        accepted = [r for r in reactor.getReaders() if isinstance(r, tcp.Server)]
        return not any(r.getHost().port == port for r in accepted)

    await eventually(reactor, closed, deadline, 0.02)
