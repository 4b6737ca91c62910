"""Checking an Ollama's health: one probe, the looping monitor and the auto-mode choice."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger


class HTTPGetter(Protocol):
    """What we need of a treq HTTPClient (treq.testing.StubTreq fits too)."""

    def get(self, url: str, /) -> defer.Deferred[Any]: ...


class OllamaUnavailable(Exception):
    """The Ollama did not give a valid answer; the message says why, in a few words."""


def _describe(failure_value: BaseException) -> str:
    if isinstance(failure_value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(failure_value, OllamaUnavailable):
        return str(failure_value)
    text = str(failure_value).strip() or type(failure_value).__name__
    return text.splitlines()[0]


class OllamaProbe:
    """Asks an Ollama at base_url for its version with GET /api/version."""

    def __init__(self, http: HTTPGetter, clock: IReactorTime, base_url: str) -> None:
        self._http = http
        self._clock = clock
        self.base_url = base_url.rstrip("/")

    def version(self, timeout: float) -> defer.Deferred[str]:
        """The version string, or OllamaUnavailable after at most timeout seconds.

        Cancelling the result cancels the request and fails with CancelledError.
        """
        fetching = defer.Deferred.fromCoroutine(self._fetch())

        def cancel(result: defer.Deferred[str]) -> None:
            result.errback(defer.CancelledError())  # first, so the fetch's failure is moot
            fetching.cancel()

        result: defer.Deferred[str] = defer.Deferred(cancel)

        def timed_out(outcome: object, timeout: float) -> None:
            raise OllamaUnavailable(f"no answer within {timeout:g} s")

        def succeeded(version: str) -> None:
            if not result.called:
                result.callback(version)

        def failed(failure: Any) -> None:
            if not result.called:
                result.errback(OllamaUnavailable(_describe(failure.value)))

        fetching.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        fetching.addCallbacks(succeeded, failed)
        return result

    async def _fetch(self) -> str:
        response = await self._http.get(self.base_url + "/api/version")
        body = await response.content()
        if response.code != 200:
            raise OllamaUnavailable(f"HTTP {response.code} from /api/version")
        try:
            version = json.loads(body)["version"]
        except (ValueError, KeyError, TypeError):
            raise OllamaUnavailable("/api/version gave no version") from None
        if not isinstance(version, str):
            raise OllamaUnavailable("/api/version gave no version")
        return version


class LocalOllamaMonitor(Service):
    """Checks the local Ollama every interval seconds and reports when it comes and goes."""

    log = Logger()

    def __init__(
        self,
        probe: OllamaProbe,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        on_up: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
    ) -> None:
        self._probe = probe
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self.on_up = on_up
        self.on_down = on_down
        self.healthy = False
        self.version: str | None = None
        self.reason = "not checked yet"
        self._loop: LoopingCall | None = None
        self._checking: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("Ollama health checks stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._checking is not None:
            self._checking.cancel()

    def check(self) -> defer.Deferred[None]:
        """Check once; the result only changes state and is never an error."""
        d: defer.Deferred[Any] = self._probe.version(self.timeout)
        d.addCallbacks(self._up, self._down)
        d.addErrback(lambda f: self.log.failure("Error while checking the local Ollama", f))
        self._checking = d

        def done(result: None) -> None:
            self._checking = None

        d.addBoth(done)
        return d

    def _up(self, version: str) -> None:
        if not self.running:
            return
        self.version = version
        self.reason = "answering"
        if not self.healthy:
            self.healthy = True
            self.log.info(
                "Local Ollama at {url} is up (version {version})",
                url=self._probe.base_url,
                version=version,
            )
            self.on_up()

    def _down(self, failure: Any) -> None:
        if not self.running:
            return  # cancelled by stopService: says nothing about the Ollama
        failure.trap(OllamaUnavailable)
        reason = str(failure.value)
        first_check = self.reason == "not checked yet"
        self.reason = reason
        if self.healthy or first_check:
            was_healthy, self.healthy = self.healthy, False
            self.log.warn(
                "Local Ollama at {url} is down: {reason}",
                url=self._probe.base_url,
                reason=reason,
            )
            if was_healthy:
                self.on_down()


async def choose_mode(
    probe: OllamaProbe, clock: IReactorTime, within: float = 2.0, every: float = 0.5
) -> tuple[str, str]:
    """Server mode when the local Ollama answers, asked every 0.5 s for 2 s; else client."""
    reason = ""
    deadline = clock.seconds() + within
    while True:
        started = clock.seconds()
        try:
            version = await probe.version(timeout=every)
        except OllamaUnavailable as e:
            reason = str(e)
        else:
            return "server", f"Ollama {version} answers at {probe.base_url}"
        next_try = started + every
        if next_try >= deadline - 1e-9:
            return "client", f"no Ollama at {probe.base_url} ({reason})"
        await deferLater(clock, max(0.0, next_try - clock.seconds()))
