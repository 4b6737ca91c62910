"""Checking an Ollama's health: one probe, the looping monitor and the auto-mode choice."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar, cast

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ollana.interfaces import JSON
from ollana.peers import Peer, PeerPool, Source, model_key
from ollana.upstream import describe_error

T = TypeVar("T")
HeadersSeen = Callable[[Headers], object]  # told the headers of an answer


VERSION_LIMIT = 64 * 1024  # bytes of an /api/version answer (Ollama's has about 20)
# A listing is bounded so that parsing one (about 1 ms) and merging four of them (under
# 10 ms) hold the reactor only briefly: at 1 MiB and 4096 entries a merge took 77 ms.
# An Ollama with 100 models lists about 50 kB.
LISTING_LIMIT = 128 * 1024  # bytes of a listing
MAX_MODELS = 1024  # entries used of one server's listing


class HTTPGetter(Protocol):
    """What we need of a treq HTTPClient (treq.testing.StubTreq fits too): a GET, with
    headers if given, whose response has a code and delivers its body as an IResponse does."""

    def get(
        self, url: str, /, *, headers: Mapping[bytes, list[bytes]] | None = None
    ) -> defer.Deferred[IResponse]: ...


class AgentGetter:
    """An HTTPGetter on a twisted.web Agent. (treq's own cannot reach IPv6 addresses: it
    IDNA-encodes the host of http://[::1]:port.)"""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def get(
        self, url: str, /, headers: Mapping[bytes, list[bytes]] | None = None
    ) -> defer.Deferred[IResponse]:
        return self._agent.request(b"GET", url.encode("ascii"), Headers(headers or {}))


class _BoundedBody(protocol.Protocol):
    """Collects a response body of at most limit bytes. Past the limit, or when cancelled,
    it stops the response's transport at once (nothing more is downloaded) and fails."""

    def __init__(self, limit: int, too_large: str) -> None:
        self.limit = limit
        self._too_large = too_large
        self._parts: list[bytes] = []
        self._length = 0
        self.body: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    @classmethod
    def read(cls, response: IResponse, limit: int, too_large: str) -> defer.Deferred[bytes]:
        """The body of response; OllamaUnavailable(too_large) past limit bytes."""
        reader = cls(limit, too_large)
        response.deliverBody(reader)
        return reader.body

    def dataReceived(self, data: bytes) -> None:
        if self.body.called:
            return
        self._length += len(data)
        if self._length > self.limit:
            self._stop()
            self.body.errback(OllamaUnavailable(self._too_large))
        else:
            self._parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.body.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # the latter: ended by a close
            self.body.callback(b"".join(self._parts))
        else:
            self.body.errback(reason)

    def _stop(self) -> None:
        self._parts = []
        if self.transport is not None:  # IResponse.deliverBody's transport is a producer
            cast(IPushProducer, self.transport).stopProducing()


class OllamaUnavailable(Exception):
    """The Ollama did not give a valid answer; the message says why, in a few words.
    ``unreachable``: the connection failed (refused, reset), rather than an answer that
    never came or was not valid."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class OllamaProbe:
    """Asks an Ollama API at base_url (an Ollama, or an Ollana proxy in front of one). An
    answer larger than its limit is a failure; of a listing, max_models entries are used."""

    log = Logger()

    def __init__(
        self,
        http: HTTPGetter,
        clock: IReactorTime,
        base_url: str,
        listing_limit: int = LISTING_LIMIT,
        max_models: int = MAX_MODELS,
    ) -> None:
        self._http = http
        self._clock = clock
        self.base_url = base_url.rstrip("/")
        self.listing_limit = listing_limit
        self.max_models = max_models

    def version(self, timeout: float, seen: HeadersSeen | None = None) -> defer.Deferred[str]:
        """The version string from GET /api/version, or OllamaUnavailable after at most
        timeout seconds. Cancelling the result cancels the request (CancelledError)."""
        return self._ask("/api/version", _version_of, timeout, VERSION_LIMIT, seen)

    def models(self, timeout: float) -> defer.Deferred[list[str]]:
        """The names of the (first max_models) models from GET /api/tags, like version()
        otherwise."""
        return self._ask("/api/tags", self._names_of, timeout, self.listing_limit)

    def json(self, path: str, timeout: float) -> defer.Deferred[JSON]:
        """The JSON answer to GET path, like version() otherwise."""
        return self._ask(path, lambda answer: answer, timeout, self.listing_limit)

    def first(self, entries: list[T], path: str) -> list[T]:
        """The entries of this server's listing at path that are used: the first
        max_models, with one log line when it cuts some."""
        if len(entries) <= self.max_models:
            return entries
        self.log.info(
            "{url}{path} lists {count} entries; only the first {used} are used",
            url=self.base_url,
            path=path,
            count=len(entries),
            used=self.max_models,
        )
        return entries[: self.max_models]

    def _ask(
        self,
        path: str,
        parse: Callable[[JSON], T],
        timeout: float,
        limit: int,
        seen: HeadersSeen | None = None,
    ) -> defer.Deferred[T]:
        fetching = defer.Deferred.fromCoroutine(self._fetch(path, parse, limit, seen))

        def cancel(result: defer.Deferred[T]) -> None:
            result.errback(defer.CancelledError())  # first, so the fetch's failure is moot
            fetching.cancel()

        result: defer.Deferred[T] = defer.Deferred(cancel)

        def timed_out(outcome: object, timeout: float) -> None:
            raise OllamaUnavailable(f"no answer within {timeout:g} s")

        def succeeded(value: T) -> None:
            if not result.called:
                result.callback(value)

        def failed(failure: Failure) -> None:
            if not result.called:
                reason = failure.value
                if not isinstance(reason, OllamaUnavailable):
                    reason = OllamaUnavailable(describe_error(reason), unreachable=True)
                result.errback(reason)

        fetching.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        fetching.addCallbacks(succeeded, failed)
        return result

    async def _fetch(
        self, path: str, parse: Callable[[JSON], T], limit: int, seen: HeadersSeen | None
    ) -> T:
        response = await self._http.get(self.base_url + path)
        headers = getattr(response, "headers", None)
        if seen is not None and headers is not None:
            seen(headers)
        too_large = f"{path} gave an answer larger than {limit} bytes"
        body = await _BoundedBody.read(response, limit, too_large)
        if response.code != 200:
            raise OllamaUnavailable(f"HTTP {response.code} from {path}")
        try:
            return parse(json.loads(body))
        except (ValueError, KeyError, TypeError):
            raise OllamaUnavailable(f"{path} gave no valid answer") from None

    def _names_of(self, answer: JSON) -> list[str]:
        models = answer["models"]
        if not isinstance(models, list):
            raise TypeError(models)
        return [str(model["name"]) for model in self.first(models, "/api/tags")]


def _version_of(answer: JSON) -> str:
    version = answer["version"]
    if not isinstance(version, str):
        raise TypeError(version)
    return version


class PeerHealthChecker(Service):
    """Checks every usable server in the pool each interval with GET /api/version through
    its proxy, keeping its health and latency; refreshes its models from /api/tags every
    models_interval and when it recovers. Static servers that stay down are checked with
    backoff; nothing it meets stops the loop."""

    log = Logger()

    def __init__(
        self,
        pool: PeerPool,
        http: HTTPGetter,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        models_interval: float,
        max_backoff: float = 60.0,
        on_report: Callable[[Peer, Headers], object] = lambda peer, headers: None,
    ) -> None:
        self.pool = pool
        pool.watch_added(self._added)
        self.on_report = on_report  # what reads the state a server reports with its answer
        self._http = http
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self.models_interval = models_interval
        self.max_backoff = max(max_backoff, interval)
        self._loop: LoopingCall | None = None
        self._checking: dict[Peer, defer.Deferred[None]] = {}  # by identity: a server
        # that said bye and came back is a new Peer, checked afresh

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("Server health checks stopped", f)
        )

    def _added(self, peer: Peer) -> None:
        """A new server (or one that moved): know its health and models before the next
        tick, while running."""
        if self.running and peer.usable and peer not in self._checking:
            self.check(peer)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for checking in list(self._checking.values()):
            checking.cancel()

    def tick(self) -> None:
        """Check each usable server that is due and not being checked already."""
        try:
            now = self._clock.seconds()
            for peer in self.pool:
                if peer.usable and peer not in self._checking and now >= peer.next_check:
                    self.check(peer)
        except Exception:
            self.log.failure("Error in the server health checks")

    def check(self, peer: Peer) -> defer.Deferred[None]:
        """Check one server now (its models too, when due); never fails."""
        probe = OllamaProbe(self._http, self._clock, peer.url)
        started = self._clock.seconds()
        d = probe.version(self.timeout, lambda h: self.on_report(peer, h)).addCallbacks(
            lambda _: self._passed(peer, probe, self._clock.seconds() - started),
            lambda failure: self._failed(peer, failure),
        )
        d.addErrback(lambda f: self.log.failure("Error while checking {url}", f, url=peer.url))
        self._checking[peer] = d

        def done(ignored: object) -> None:
            self._checking.pop(peer, None)

        d.addBoth(done)
        return d

    def suspect(self, peer: Peer, reason: str) -> None:
        """A request could not reach peer: take it out of use and check it at the next tick."""
        self.pool.suspect(peer, reason)

    def _passed(
        self, peer: Peer, probe: OllamaProbe, latency: float
    ) -> defer.Deferred[None] | None:
        if not self.running:
            return None
        recovered = self.pool.check_succeeded(peer, latency)
        checked = peer.models_checked
        if recovered or checked is None or self._clock.seconds() - checked >= self.models_interval:
            return probe.models(self.timeout).addCallbacks(
                lambda names: self._got_models(peer, names),
                lambda failure: self._no_models(peer, failure),
            )
        return None

    def _got_models(self, peer: Peer, names: list[str]) -> None:
        peer.models = frozenset(model_key(name) for name in names)
        peer.models_checked = self._clock.seconds()

    def _no_models(self, peer: Peer, failure: Failure) -> None:
        if self.running:
            failure.trap(OllamaUnavailable)
            self.log.info("No model list from {url}: {reason}", url=peer.url,
                          reason=str(failure.value))  # fmt: skip

    def _failed(self, peer: Peer, failure: Failure) -> None:
        if not self.running:
            return  # cancelled by stopService: says nothing about the server
        failure.trap(OllamaUnavailable)
        self.pool.check_failed(peer, str(failure.value))
        if peer.source is Source.STATIC and not peer.healthy:
            extra = max(0, peer.failures - self.pool.unhealthy_after)
            backoff = min(self.interval * 2 ** min(extra, 16), self.max_backoff)
            peer.next_check = self._clock.seconds() + backoff


NOT_CHECKED = "not checked yet"


class LocalOllamaMonitor(Service):
    """Checks the local Ollama every interval seconds and reports when it comes and goes.

    The proxy's own requests tell it too (``answered``, ``unreachable``), so that an Ollama
    that comes back is used by the very next request rather than after the next check.
    """

    log = Logger()

    def __init__(
        self,
        probe: OllamaProbe,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        on_up: Callable[[], object] = lambda: None,
        on_down: Callable[[str], object] = lambda reason: None,
    ) -> None:
        self._probe = probe
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self._watchers = [(on_up, on_down)]
        self.healthy = False
        self.version: str | None = None
        self.reason = NOT_CHECKED
        self.cheap_to_try = False  # down, but only connecting failed (not hung, not broken)
        self._loop: LoopingCall | None = None
        self._checking: defer.Deferred[None] | None = None

    def watch(self, on_up: Callable[[], object], on_down: Callable[[str], object]) -> None:
        """Call on_up when the Ollama comes up, on_down(reason) when it goes down or hangs."""
        self._watchers.append((on_up, on_down))

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

    @property
    def url(self) -> str:
        return self._probe.base_url

    @property
    def known_down(self) -> bool:
        """Whether a check has found the Ollama down (and none since found it up)."""
        return not self.healthy and self.reason != NOT_CHECKED

    def check(self) -> defer.Deferred[None]:
        """Check once; the result only changes state and is never an error."""
        d = self._probe.version(self.timeout).addCallbacks(self._up, self._down)
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
        self._came_up(f"version {version}")

    def answered(self) -> None:
        """A request got an answer from the Ollama: it is up, whatever the last check said."""
        if self.running and not self.healthy and self.reason != NOT_CHECKED:
            self._came_up("it answered a request")

    def _came_up(self, how: str) -> None:
        self.reason = "answering"
        self.cheap_to_try = False
        if not self.healthy:
            self.healthy = True
            self.log.info("Local Ollama at {url} is up ({how})", url=self.url, how=how)
            self._tell(0)

    def unreachable(self, reason: str) -> None:
        """A request could not reach the Ollama (refused, say): it is down until it answers."""
        if self.running and self.healthy:
            self._went_down(reason, cheap_to_try=True)

    def _down(self, failure: Failure) -> None:
        if not self.running:
            return  # cancelled by stopService: says nothing about the Ollama
        failure.trap(OllamaUnavailable)
        down = cast(OllamaUnavailable, failure.value)  # trapped
        self._went_down(str(down), down.unreachable)

    def _went_down(self, reason: str, cheap_to_try: bool) -> None:
        first_check = self.reason == NOT_CHECKED
        self.reason = reason
        was_healthy, self.healthy = self.healthy, False
        hung = self.cheap_to_try and not cheap_to_try  # refused before, hangs or fails now
        self.cheap_to_try = cheap_to_try
        if was_healthy or first_check:
            self.log.warn("Local Ollama at {url} is down: {reason}", url=self.url, reason=reason)
        if was_healthy or hung:
            self._tell(1, reason)

    def _tell(self, which: int, *args: str) -> None:
        for watcher in self._watchers:
            try:
                watcher[which](*args)
            except Exception:
                self.log.failure("Error telling that the local Ollama came or went")


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
