"""Server mode's view of its Ollama's load, for the state report clients route by.

``OllamaLoad`` counts the requests for a model that the server relays (in flight, and of
those still waiting for the first byte of their answer; requests that name no model, such
as listings and version checks, take no slot and are not counted), knows the loaded models from the
Ollama's /api/ps (read every interval, and again soon after a request for a model that
was not loaded has its answer), and the Ollama's slots and queue as the options (or the
environment the Ollama reads) say. Requests that reach the Ollama some other way are not
seen: the report is of the LAN's traffic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ollana.health import OllamaProbe, OllamaUnavailable
from ollana.interfaces import JSON, IServerState, IStateSource
from ollana.peers import model_key
from ollana.state import (
    DEFAULT_MAX_LOADED,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PARALLEL,
    ServerState,
    encode,
)


def ollama_limits(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """Slots per model, queue and loaded models as an Ollama started with this environment
    has them (OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE, OLLAMA_MAX_LOADED_MODELS), with
    Ollama's defaults where they are unset or not numbers."""

    def read(name: str, default: int) -> int:
        try:
            value = int(environ.get(name, ""))
        except ValueError:
            return default
        return value if value > 0 else default

    return (
        read("OLLAMA_NUM_PARALLEL", DEFAULT_PARALLEL),
        read("OLLAMA_MAX_QUEUE", DEFAULT_MAX_QUEUE),
        read("OLLAMA_MAX_LOADED_MODELS", DEFAULT_MAX_LOADED),
    )


def environment_limits() -> tuple[int, int, int]:
    """ollama_limits of this process's environment (Ollama's, where it runs beside us)."""
    return ollama_limits(os.environ)


@implementer(IStateSource)
class OllamaLoad(TimerService):
    """Counts relayed requests per model and reads /api/ps every interval; reports both."""

    log = Logger()

    def __init__(
        self,
        probe: OllamaProbe,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        parallel: int = DEFAULT_PARALLEL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_loaded: int = DEFAULT_MAX_LOADED,
        secret: bytes | None = None,
    ) -> None:
        super().__init__(interval, self.read_loaded)
        self.clock = clock
        self._probe = probe
        self.timeout = timeout
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_loaded = max_loaded
        self._secret = secret
        self.loaded: frozenset[str] = frozenset()
        self._counts: dict[str, list[int]] = {}  # model: [in flight, waiting]
        self._header: bytes | None = None  # the encoded report, until something changes
        self._reading: defer.Deferred[JSON] | None = None
        self._read_again = False

    # The requests, as the server's router sees them.

    def started(self, model: str | None) -> None:
        if not model:
            return  # not a model's work (a listing, a version check): no slot taken
        counts = self._counts.setdefault(model_key(model), [0, 0])
        counts[0] += 1
        counts[1] += 1
        self._header = None

    def answered(self, model: str | None) -> None:
        if not model:
            return
        name = model_key(model)
        counts = self._counts.get(name)
        if counts is not None and counts[1] > 0:
            counts[1] -= 1
            self._header = None
        if name not in self.loaded:
            self.read_loaded()  # it is loaded now, and another may have been evicted

    def ended(self, model: str | None, answered: bool) -> None:
        counts = self._counts.get(model_key(model)) if model else None
        if counts is None:
            return
        counts[0] -= 1
        if not answered and counts[1] > 0:
            counts[1] -= 1
        if counts[0] <= 0:
            del self._counts[model_key(model)]  # type: ignore[arg-type]
        self._header = None

    def would_queue(self, model: str) -> bool:
        """Whether a request for model would wait now: every slot of it is taken, or it is
        not loaded and a load would have to wait for a busy model's eviction."""
        name = model_key(model)
        counts = self._counts.get(name)
        if counts is not None and counts[0] >= self.parallel:
            return True
        wanted = self.loaded | {other for other, c in self._counts.items() if c[0]}
        full = len(wanted) >= self.max_loaded  # loaded, or about to be for what is queued
        return name not in wanted and full and any(c[0] for c in self._counts.values())

    # The report.

    def report(self) -> IServerState:
        return ServerState(
            parallel=self.parallel,
            max_queue=self.max_queue,
            max_loaded=self.max_loaded,
            loaded=self.loaded,
            models={name: (c[0], c[1]) for name, c in self._counts.items()},
        )

    def header(self) -> bytes:
        if self._header is None:
            self._header = encode(self.report(), self._secret)  # type: ignore[arg-type]
        return self._header

    # The loaded models.

    def stopService(self) -> defer.Deferred[None]:
        stopped: defer.Deferred[None] = super().stopService()
        self._read_again = False  # asked before the stop: not after a restart
        if self._reading is not None:
            self._reading.cancel()
        return stopped

    def read_loaded(self) -> None:
        """Ask /api/ps now (or once the question under way is answered)."""
        if self._reading is not None:
            self._read_again = True
            return
        reading = self._probe.json("/api/ps", self.timeout)
        self._reading = reading
        reading.addCallbacks(self._got_loaded, self._no_loaded)
        reading.addErrback(lambda f: self.log.failure("Error reading the loaded models", f))
        reading.addBoth(self._read)

    def _read(self, ignored: object) -> None:
        self._reading = None
        if self._read_again and self.running:
            self._read_again = False
            self.read_loaded()

    def _got_loaded(self, answer: JSON) -> None:
        entries = answer.get("models") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            return
        names = [entry.get("name") for entry in entries if isinstance(entry, dict)]
        loaded = frozenset(model_key(name) for name in names if isinstance(name, str))
        if loaded != self.loaded:
            self.loaded = loaded
            self._header = None

    def _no_loaded(self, failure: Failure) -> None:
        failure.trap(OllamaUnavailable, defer.CancelledError)  # the monitor says it is down
