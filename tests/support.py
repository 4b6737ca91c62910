"""Test doubles for the network: a fake datagram transport and a reactor that hands them out.

``MemoryReactor`` has no UDP, so ``FakeNetworkReactor`` adds ``listenUDP`` and
``listenMulticast`` that return ``FakeDatagramPort`` objects. A test reads what a
protocol sent from ``port.written`` and feeds it datagrams with
``port.protocol.datagramReceived(data, addr)``. Time is the reactor's ``Clock``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase


def capture_logs(case: SynchronousTestCase) -> EventLoggingObserver:
    """Log events emitted during the test, as a list of event dicts."""
    return EventLoggingObserver.createWithCleanup(case, globalLogPublisher)  # type: ignore[arg-type]


class FakeDatagramPort:
    """A bound UDP socket in memory: records writes; can be told to fail them."""

    def __init__(self, protocol: DatagramProtocol, port: int, interface: str = "") -> None:
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.broadcast_allowed = False
        self.listening = True
        self.write_error: OSError | None = None
        protocol.makeConnection(self)  # type: ignore[arg-type]

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append((data, addr))

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast_allowed = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast_allowed

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.protocol.doStop()

    loseConnection = stopListening

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What was written since the last take."""
        written, self.written = self.written, []
        return written


class FakeNetworkReactor(MemoryReactorClock):
    """MemoryReactorClock with UDP; ports in use can be declared to test bind errors."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[FakeDatagramPort] = []
        self.busy_udp_ports: set[int] = set()
        self.udp_write_error: OSError | None = None
        self._next_port = 40000

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeDatagramPort:
        return self._bind(port, protocol, interface)

    def listenMulticast(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeDatagramPort:
        return self._bind(port, protocol, interface)

    def _bind(self, port: int, protocol: Any, interface: str) -> FakeDatagramPort:
        if port in self.busy_udp_ports:
            raise error.CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        if port == 0:
            self._next_port += 1
            port = self._next_port
        bound = FakeDatagramPort(protocol, port, interface)
        bound.write_error = self.udp_write_error
        self.udp_ports.append(bound)
        return bound

    def udp_port(self, port: int) -> FakeDatagramPort:
        """The listening fake port bound to this number."""
        for bound in self.udp_ports:
            if bound.port == port and bound.listening:
                return bound
        raise LookupError(f"nothing listens on UDP port {port}")


REPO = Path(__file__).resolve().parent.parent


def python_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's ollana and plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("OLLAMA_HOST", None)
    return env


def free_udp_port() -> int:
    """A UDP port on loopback that nothing uses at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def signal(self, name: str) -> None:
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
