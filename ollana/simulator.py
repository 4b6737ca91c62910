"""A simulated Ollama for the demo, the tests and the benchmarks: a twisted.web resource tree.

``FakeOllama`` (also known as ``SimulatedOllama``) answers the parts of Ollama's API that
Ollana and Ollama's clients use, in Ollama's JSON shapes and with Ollama's errors, without
any model: every model "answers" by echoing the prompt (or the last message) word by word.
``ollana demo`` runs one with the single model ``echo`` (``ECHO_MODEL``)::

    fake = FakeOllama(version="0.12.0", models=["llama3.2:latest"], clock=reactor)
    site = fake.site()

The API:

- ``GET /``, ``/api/version``, ``/api/tags``, ``/api/ps``, ``/v1/models``.
- ``POST /api/generate`` and ``/api/chat`` stream NDJSON, one line per word of the answer,
  then a final line with Ollama's counts and durations (nanoseconds), or answer once with
  ``"stream": false``; ``POST /v1/chat/completions`` does the same as SSE. An empty prompt
  (no messages) loads the model (``"done_reason": "load"``), or with ``keep_alive`` 0
  unloads it (``"unload"``).
- ``POST /api/embed`` and ``/api/embeddings`` give small vectors.
- ``POST /api/blobs/sha256:<hex>`` stores a blob after checking its digest (201, 200 when
  already there, 400); ``HEAD`` of the same path says whether it is there (200 or 404).
- Model management: ``POST /api/pull`` streams progress and adds the model (any name, or
  only those in ``library`` when given); ``DELETE /api/delete``; ``POST /api/copy``;
  ``POST /api/create`` from ``files`` (names to ``sha256:`` digests of stored blobs) or
  ``from`` a model.
- Ollama's errors, as Ollama 0.12 words them: a model it does not have is 404
  ``model 'x' not found`` (``/api/embed``: ``model "x" not found, try pulling it first``;
  ``/api/copy``: ``model "x" not found``), the name written as the request gave it; an
  empty body is 400 ``missing request body``; bad JSON 400 with Go's message; an unknown
  path 404 ``404 page not found`` and a known path with another method 405, as gin says.
  ``/v1`` errors come in OpenAI's shape. A name without a tag means ``:latest``.
- Browsers: requests with an ``Origin`` are answered with Ollama's policy
  (``ollana.origins``): 403 for an origin Ollama refuses, preflights answered 204 with
  gin-contrib/cors's headers. ``origins=OriginPolicy.from_env(os.environ)`` honours
  ``OLLAMA_ORIGINS``; the default is Ollama's own list.

Scheduling: by default every model answers at once, as if loaded, with unlimited slots.
With ``scheduling=Scheduling(...)`` (which needs a clock) the fake schedules as Ollama does
(``ModelScheduler``): at most ``max_loaded`` models in memory, each loading in
``load_seconds``, an idle one evicted to make room (a busy one when none is idle, once it
is done, everything else waiting meanwhile); ``num_parallel`` slots per model, each holding
the tokens of its last request, prompt and answer, as a prompt cache (tokens are words, a
role token per message and one for the answer's turn, so that a chat's next turn, which
resends the answer, finds it all); a request takes the free slot with the longest common
prefix with its prompt and pays ``prefill_seconds_per_token`` for the rest only, then one
token every ``token_seconds``; the rest wait in order, and past ``max_queue`` waiting
requests the answer is 503 ``server busy, please try again.  maximum pending requests
exceeded``. A model stays ``keep_alive`` seconds after its last request (a request's
``keep_alive`` wins: seconds or a Go duration, 0 unloads when done, negative keeps it).
``fake.scheduler`` counts loads, evictions, expirations and rejections, and keeps a
``RequestRecord`` per request (its wait, load, cached tokens, time to first token).

Pacing without scheduling: with ``fake.pace = seconds`` the stream waits that long (on the
given clock) before each chunk. With ``fake.gated = True`` it waits for ``fake.release()``
instead, so a test decides exactly when each chunk leaves (with scheduling, the gate stands
for ``token_seconds`` and the final chunk follows the last word at once). ``fake.emitted``
counts the chunks written, ``fake.open_streams`` the generations under way and
``fake.abandoned`` those whose client went away. Set ``fake.up = False`` to answer 500
everywhere, as an Ollama that is starting or broken does. ``fake.requests`` lists
(method, path) and ``fake.headers`` the request headers; with ``record=False`` neither is
kept (for a long-running demo).

Run it standalone on loopback with ``python -m ollana.simulator --port 11434`` (the ``echo``
model, 0.05 s between tokens; ``--max-loaded``, ``--num-parallel``, ``--load-seconds`` and
the other scheduling options turn scheduling on; ``OLLAMA_ORIGINS`` is honoured), or
``python -m tests.support.fake_ollama`` (the tests' ``llama3.2:latest``, no pacing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ollana.interfaces import JSON, JSONObject
from ollana.origins import OriginPolicy

CREATED = "2026-11-22T00:00:00Z"
ECHO_MODEL = "echo:latest"
DEFAULT_MODELS = ["llama3.2:latest"]
BUSY = "server busy, please try again.  maximum pending requests exceeded"
FOREVER = (2**63 - 1) / 1e9  # Go's longest Duration, in seconds: Ollama's "keep it loaded"
MODEL_SIZE = 1000
PULL_ERROR = "pull model manifest: file does not exist"

_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([^\d.]*)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def full_name(model: str) -> str:
    """A model name as Ollama reads it: no tag means ``:latest``."""
    return model if ":" in model.rpartition("/")[2] else model + ":latest"


def go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"5m"``, ``"1h30m"``, ``"-1s"``, ``"0"``)."""
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    seconds, position = 0.0, 0
    while rest and position < len(rest):
        part = _DURATION_PART.match(rest, position)
        if part is None:
            raise ValueError(f'time: invalid duration "{text}"')
        if not part.group(2):
            raise ValueError(f'time: missing unit in duration "{text}"')
        if part.group(2) not in _UNITS:
            raise ValueError(f'time: unknown unit "{part.group(2)}" in duration "{text}"')
        seconds += float(part.group(1)) * _UNITS[part.group(2)]
        position = part.end()
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * seconds


def keep_alive_seconds(value: object) -> float:
    """A request's ``keep_alive`` as Ollama reads it: seconds, or a Go duration string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        names = {bool: "bool", dict: "map[string]interface {}", list: "[]interface {}"}
        raise ValueError(f"Unsupported type: '{names.get(type(value), type(value).__name__)}'")
    seconds = go_duration(value) if isinstance(value, str) else float(value)
    return FOREVER if seconds < 0 else seconds


def rfc3339(seconds: float) -> str:
    """A clock's time as Go writes a UTC time in JSON."""
    moment = datetime.fromtimestamp(min(seconds, 253402300799.0), tz=timezone.utc)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def prompt_tokens(path: str, body: Mapping[str, JSON]) -> list[str]:
    """A request's prompt as the simulator's tokens: words, with a role token per message."""
    if path == "/api/generate":
        system = str(body.get("system") or "").split()
        return [*(["system", *system] if system else []), "user",
                *str(body.get("prompt") or "").split(), "assistant"]  # fmt: skip
    tokens = []
    for message in body.get("messages") or []:
        message = message if isinstance(message, dict) else {}
        tokens += [str(message.get("role") or "user"), *_text(message.get("content")).split()]
    return [*tokens, "assistant"]  # the template's turn for the answer, as in a chat template


def answer_words(path: str, body: Mapping[str, JSON]) -> list[str]:
    """The echo: the prompt's words, or the last message's; ``ok`` when there are none."""
    if path == "/api/generate":
        return str(body.get("prompt") or "").split() or ["ok"]
    messages = body.get("messages") or [{}]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    return _text(last.get("content")).split() or ["ok"]


def _text(content: JSON) -> str:
    if isinstance(content, list):  # OpenAI's content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


@dataclass(frozen=True)
class Scheduling:
    """How the simulated Ollama schedules, with Ollama's defaults; times in seconds.

    ``max_loaded`` is OLLAMA_MAX_LOADED_MODELS, ``num_parallel`` OLLAMA_NUM_PARALLEL,
    ``max_queue`` OLLAMA_MAX_QUEUE and ``keep_alive`` OLLAMA_KEEP_ALIVE (``FOREVER`` to keep).
    ``model_load_seconds`` gives some models their own load time.
    """

    max_loaded: int = 3
    num_parallel: int = 1
    max_queue: int = 512
    load_seconds: float = 2.0
    model_load_seconds: Mapping[str, float] = field(default_factory=dict)
    prefill_seconds_per_token: float = 0.005
    token_seconds: float = 0.05
    keep_alive: float = 300.0
    context_length: int = 4096

    def __post_init__(self) -> None:
        if self.max_loaded < 1 or self.num_parallel < 1 or self.max_queue < 1:
            raise ValueError("max_loaded, num_parallel and max_queue must be at least 1")

    def load_time(self, model: str) -> float:
        """Seconds this model takes to load."""
        for name, seconds in self.model_load_seconds.items():
            if full_name(name) == full_name(model):
                return seconds
        return self.load_seconds


@dataclass
class RequestRecord:
    """One request as the simulated server saw it; seconds on its clock.

    ``wait`` is the time spent queued (for the scheduler, an eviction or a slot) and
    ``load`` the time spent waiting for the model to load; the request started at
    ``arrived + wait + load``. ``cold`` says its arrival made the model load.
    ``outcome``: done, gone (the client left), busy (503), load or unload.
    """

    model: str
    path: str
    arrived: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    eval_count: int = 0
    cold: bool = False
    wait: float = 0.0
    load: float = 0.0
    first_token: float | None = None
    total: float | None = None
    outcome: str = "done"


class ServerBusy(Exception):
    """More requests wait than ``max_queue`` allows: Ollama's 503."""


@dataclass(eq=False)
class Slot:
    """One of a loaded model's parallel slots, with its prompt cache."""

    index: int
    tokens: list[str] = field(default_factory=list)
    busy: bool = False


class Runner:
    """A model in the simulated server's memory (loading or loaded), Ollama's runnerRef."""

    def __init__(self, model: str, slots: int, keep_alive: float, now: float) -> None:
        self.model = model
        self.slots = [Slot(i) for i in range(slots)]
        self.loading = True
        self.refs = 0  # requests holding it: running, or waiting for a slot
        self.waiting: deque[Job] = deque()
        self.keep_alive = keep_alive
        self.evicting = False  # chosen to make room: unloads as soon as it is idle
        self.last_used = now
        self.expires_at: float | None = None  # set while idle with a timer
        self.load_call: IDelayedCall | None = None
        self.expiry: IDelayedCall | None = None

    @property
    def busy_slots(self) -> int:
        return sum(slot.busy for slot in self.slots)


class Job:
    """A request for a model, from its arrival to its end, as the scheduler moves it."""

    def __init__(
        self,
        model: str,
        path: str,
        tokens: list[str],
        keep_alive: float | None,
        arrived: float,
        needs_slot: bool = True,
        cache: bool = True,
    ) -> None:
        self.model = full_name(model)
        self.tokens = tokens
        self.keep_alive = keep_alive  # None: the request did not say
        self.needs_slot = needs_slot  # a load request needs the model only
        self.cache = cache
        self.started: defer.Deferred[None] = defer.Deferred()
        self.runner: Runner | None = None
        self.slot: Slot | None = None
        self.attached_at: float | None = None
        self.ready_at: float | None = None
        self.released = False
        self.record = RequestRecord(self.model, path, arrived, prompt_tokens=len(tokens))

    @property
    def cached(self) -> int:
        return self.record.cached_tokens


class ModelScheduler:
    """Ollama's scheduler and runners on a clock: loads, evictions, slots, caches, expiry.

    As in Ollama, the scheduler takes waiting requests in order; when the head's model is
    not loaded and ``max_loaded`` models are, it picks one to unload (an idle one with the
    shortest keep_alive; if none is idle, a busy one, which unloads once its requests end)
    and everything behind the head waits until it has, requests for loaded models too.
    Two differences: Ollama breaks a keep_alive tie by the model's blob path, fixed but
    arbitrary, this by least recent use; and Ollama bounds only the requests waiting for
    the scheduler, while ``max_queue`` here counts those waiting for a slot too, so that a
    test can reach the 503 (the default, 512, is rarely reached either way).
    """

    def __init__(self, scheduling: Scheduling, clock: IReactorTime) -> None:
        self.config = scheduling
        self.clock = clock
        self.runners: dict[str, Runner] = {}
        self.pending: deque[Job] = deque()
        self.loads = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0
        self.records: deque[RequestRecord] = deque(maxlen=100_000)
        self._blocked: Runner | None = None

    def loaded(self) -> list[str]:
        """The models in memory, loading ones included."""
        return list(self.runners)

    def waiting(self) -> int:
        """The requests waiting for the scheduler or for a slot."""
        return len(self.pending) + sum(len(r.waiting) for r in self.runners.values())

    def submit(self, job: Job) -> None:
        """Queue a request; ``job.started`` fires when it may run. Raises ServerBusy."""
        if self.waiting() >= self.config.max_queue:
            self.rejected += 1
            job.record.outcome = "busy"
            self.records.append(job.record)
            raise ServerBusy(BUSY)
        self.pending.append(job)
        self._schedule()

    def release(self, job: Job, tokens: list[str] | None = None) -> None:
        """The request ended or its client left: free its slot (keeping ``tokens`` cached)."""
        if job.released:
            return
        job.released = True
        runner = job.runner
        if runner is None:
            if job in self.pending:
                self.pending.remove(job)
            return
        if job in runner.waiting:
            runner.waiting.remove(job)
        if job.slot is not None:
            job.slot.busy = False
            if tokens is not None and job.cache:
                job.slot.tokens = tokens
            job.slot = None
        runner.refs -= 1
        runner.last_used = self.clock.seconds()
        if runner.refs:
            self._dispatch(runner)
        else:
            self._idle(runner)

    def unload(self, model: str) -> None:
        """Unload a model once idle (a request with keep_alive 0 and no prompt)."""
        runner = self.runners.get(full_name(model))
        if runner is not None:
            runner.keep_alive = 0.0
            if not runner.refs:
                self._idle(runner)

    def expires_at(self, runner: Runner) -> float:
        """When this model will be unloaded, as /api/ps says."""
        if runner.expires_at is not None:
            return runner.expires_at
        return self.clock.seconds() + runner.keep_alive

    def _schedule(self) -> None:
        while self.pending and self._blocked is None:
            job = self.pending[0]
            runner = self.runners.get(job.model)
            if runner is None and len(self.runners) >= self.config.max_loaded:
                victim = self._victim()
                victim.evicting = True
                if victim.refs:
                    self._blocked = victim
                    return
                self._unload(victim)
                self.evictions += 1
                continue
            self.pending.popleft()
            if runner is None:
                runner = self._load(job.model)
                job.record.cold = True
            self._attach(job, runner)

    def _victim(self) -> Runner:
        runners = sorted(self.runners.values(), key=lambda r: (r.keep_alive, r.last_used))
        idle = [r for r in runners if not r.refs]
        return (idle or runners)[0]

    def _load(self, model: str) -> Runner:
        now = self.clock.seconds()
        runner = Runner(model, self.config.num_parallel, self.config.keep_alive, now)
        self.runners[model] = runner
        self.loads += 1
        seconds = self.config.load_time(model)
        if seconds > 0:
            runner.load_call = self.clock.callLater(seconds, self._loaded, runner)
        else:
            runner.loading = False
        return runner

    def _loaded(self, runner: Runner) -> None:
        runner.load_call = None
        runner.loading = False
        now = self.clock.seconds()
        for job in runner.waiting:
            job.ready_at = now
            assert job.attached_at is not None
            job.record.load = now - job.attached_at
        self._dispatch(runner)

    def _attach(self, job: Job, runner: Runner) -> None:
        now = self.clock.seconds()
        job.runner = runner
        job.attached_at = now
        if not runner.loading:
            job.ready_at = now
        runner.refs += 1
        runner.last_used = now
        if job.keep_alive is not None:
            runner.keep_alive = job.keep_alive
        if runner.expiry is not None:
            runner.expiry.cancel()
            runner.expiry = None
        runner.expires_at = None
        runner.waiting.append(job)
        self._dispatch(runner)

    def _dispatch(self, runner: Runner) -> None:
        """Start what can start on this runner, in order; a start may end jobs at once."""
        while not runner.loading and runner.waiting:
            job = next((j for j in runner.waiting if not j.needs_slot), runner.waiting[0])
            if job.needs_slot:
                free = [slot for slot in runner.slots if not slot.busy]
                if not free:
                    return
                # The runner's choice: the free slot sharing the longest prefix, the first on a tie.
                slot = max(free, key=lambda s: _common_prefix(s.tokens, job.tokens))
                cached = _common_prefix(slot.tokens, job.tokens) if job.cache else 0
                if cached and cached == len(job.tokens):
                    cached -= 1  # one token is always evaluated, for the answer's first
                slot.busy = True
                slot.tokens = job.tokens[:cached]
                job.slot = slot
                job.record.cached_tokens = cached
            runner.waiting.remove(job)
            started = self.clock.seconds()
            job.record.wait = started - job.record.arrived - job.record.load
            job.started.callback(None)

    def _idle(self, runner: Runner) -> None:
        if runner.evicting:
            self._unload(runner)
            self.evictions += 1
        elif runner.keep_alive <= 0:
            self._unload(runner)
            self.expirations += 1
        elif runner.keep_alive < FOREVER:
            runner.expires_at = self.clock.seconds() + runner.keep_alive
            runner.expiry = self.clock.callLater(runner.keep_alive, self._expire, runner)
            return
        else:
            return
        if self._blocked is runner:
            self._blocked = None
        self._schedule()

    def _expire(self, runner: Runner) -> None:
        runner.expiry = None
        if not runner.refs and self.runners.get(runner.model) is runner:
            self._unload(runner)
            self.expirations += 1
            self._schedule()

    def _unload(self, runner: Runner) -> None:
        for call in (runner.load_call, runner.expiry):
            if call is not None and call.active():
                call.cancel()
        runner.load_call = runner.expiry = None
        del self.runners[runner.model]


def _common_prefix(a: list[str], b: list[str]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class FakeOllama:
    """A simulated Ollama (see the module docstring): the state behind the resource tree."""

    def __init__(
        self,
        version: str = "0.12.0",
        models: list[str] | None = None,
        clock: IReactorTime | None = None,
        record: bool = True,
        scheduling: Scheduling | None = None,
        origins: OriginPolicy | None = None,
        library: Iterable[str] | None = None,
    ) -> None:
        if scheduling is not None and clock is None:
            raise ValueError("scheduling needs a clock")
        self.version = version
        self.models = list(models if models is not None else DEFAULT_MODELS)
        self.clock = clock
        self.record = record
        self.scheduler = ModelScheduler(scheduling, clock) if scheduling and clock else None
        self.origins = origins if origins is not None else OriginPolicy()
        self.library = None if library is None else {full_name(m) for m in library}
        self.up = True
        self.pace = 0.0
        self.gated = False
        self.emitted = 0
        self._gates: list[defer.Deferred[None]] = []
        self._released = 0
        self.blobs: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.headers: list[Headers] = []
        self.open_streams = 0
        self.abandoned = 0

    def has(self, model: str) -> bool:
        """Whether this model is here (``echo`` finds ``echo:latest``)."""
        return full_name(model) in {full_name(m) for m in self.models}

    def pullable(self, model: str) -> bool:
        """Whether a pull of this model would find it."""
        return self.library is None or full_name(model) in self.library

    def add(self, model: str) -> None:
        if not self.has(model):
            self.models.append(full_name(model))

    def remove(self, model: str) -> None:
        self.models = [m for m in self.models if full_name(m) != full_name(model)]

    def now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def resource(self) -> Resource:
        return _Root(self)

    def site(self, access_log: bool = True) -> Site:
        """A Site for the fake, timing out idle connections on its clock, if it has one;
        without access_log, it logs no line per request."""
        site_class = Site if access_log else _QuietSite
        if self.clock is None:
            return site_class(self.resource())
        return site_class(self.resource(), reactor=self.clock)

    def release(self, chunks: int = 1) -> None:
        """With gated streams: let this many more chunks go."""
        for _ in range(chunks):
            if self._gates:
                self._gates.pop(0).callback(None)
            else:
                self._released += 1

    def _gate(self) -> defer.Deferred[None] | None:
        if self._released:
            self._released -= 1
            return None
        gate: defer.Deferred[None] = defer.Deferred(lambda d: self._gates.remove(d))
        self._gates.append(gate)
        return gate

    def _before_chunk(self) -> defer.Deferred[None] | None:
        """Without scheduling: the wait before each piece of a stream."""
        if self.gated:
            return self._gate()
        if self.pace and self.clock is not None:
            return task.deferLater(self.clock, self.pace)
        return None

    def _before_token(self, when: float) -> defer.Deferred[None] | None:
        """With scheduling: the wait for a generated token, due at this time (or the gate)."""
        return self._gate() if self.gated else self._at(when)

    def _at(self, when: float) -> defer.Deferred[None] | None:
        """A wait until this time on the clock, if it is still to come."""
        if self.clock is None or when <= self.clock.seconds():
            return None
        return task.deferLater(self.clock, when - self.clock.seconds())


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        pass


class _BadRequest(Exception):
    """A request Ollama refuses with 400 (or another ``code``) before doing anything."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


_GET_PATHS = frozenset({"/", "/api/version", "/api/tags", "/api/ps", "/v1/models"})
_POST_TYPES = {
    "/api/generate": "GenerateRequest",
    "/api/chat": "ChatRequest",
    "/api/show": "ShowRequest",
    "/api/embed": "EmbedRequest",
    "/api/embeddings": "EmbeddingRequest",
    "/api/pull": "PullRequest",
    "/api/create": "CreateRequest",
    "/api/copy": "CopyRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
}
_GENERATION_PATHS = frozenset({"/api/generate", "/api/chat", "/v1/chat/completions"})


def _json(request: Request, code: int, body: JSON) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(body).encode("utf-8")


def _plain(request: Request, code: int, text: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain")
    return text


def _error(request: Request, code: int, message: str, openai: bool = False) -> bytes:
    """Ollama's error body, or OpenAI's shape of it under ``/v1``."""
    if not openai:
        return _json(request, code, {"error": message})
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(code, "api_error")
    return _json(request, code, {"error": {"message": message, "type": kind, "param": None,
                                           "code": None}})  # fmt: skip


def _content(request: Request) -> IO[bytes]:
    assert request.content is not None
    return request.content


def _decode(raw: bytes, type_name: str) -> JSONObject:
    """A JSON request body as Go's decoder takes it, with Go's messages when it cannot."""
    text = raw.strip()
    if not text:
        raise _BadRequest("EOF" if type_name == "ChatCompletionRequest" else "missing request body")
    try:
        value = json.loads(raw)
    except ValueError:
        first = chr(text[0])
        if first not in '{["-0123456789tfn':
            raise _BadRequest(
                f"invalid character '{first}' looking for beginning of value"
            ) from None
        raise _BadRequest("unexpected EOF") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = {list: "array", str: "string", bool: "bool"}.get(type(value), "number")
        package = "openai" if type_name == "ChatCompletionRequest" else "api"
        raise _BadRequest(
            f"json: cannot unmarshal {kind} into Go value of type {package}.{type_name}"
        )
    return value


def _model_entry(name: str) -> JSONObject:
    return {
        "name": name,
        "model": name,
        "modified_at": CREATED,
        "size": MODEL_SIZE,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(),
    }


def _details() -> JSONObject:
    return {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
            "parameter_size": "1B", "quantization_level": "Q4_K_M"}  # fmt: skip


class _Exchange:
    """One answer under way: whether its client left, and the wait to cancel when it does."""

    def __init__(self, fake: FakeOllama, request: Request) -> None:
        self.fake = fake
        self.gone = False
        self.cache: list[str] | None = None  # what its slot will hold if it ends now
        self._waiting: defer.Deferred[None] | None = None
        request.notifyFinish().addErrback(self._left)

    def _left(self, _: object) -> None:
        self.gone = True
        self.fake.abandoned += 1
        if self._waiting is not None:
            self._waiting.cancel()

    async def wait(self, waiting: defer.Deferred[None] | None) -> None:
        """Wait for this, unless the client leaves first (then CancelledError)."""
        if waiting is None:
            return
        self._waiting = waiting
        try:
            await waiting
        finally:
            self._waiting = None


Answer = bytes | int  # a resource's: the body, or NOT_DONE_YET
_Run = Callable[[_Exchange], Awaitable[tuple[int, JSON] | None]]


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> Answer:
        fake = self.fake
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        if fake.record:
            fake.requests.append((method, path))
            fake.headers.append(request.requestHeaders.copy())
        if not fake.up:
            return _json(request, 500, {"error": "fake ollama is down"})
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        cors = fake.origins.answer(
            method,
            origin.decode("latin-1") if origin is not None else None,
            host.decode("latin-1") if host is not None else None,
        )
        for name, value in cors.headers:
            request.responseHeaders.addRawHeader(name, value)
        if cors.status is not None:
            request.setResponseCode(cors.status)
            return b""
        if method == "OPTIONS":
            request.setHeader(b"Allow", b"GET, HEAD, POST, DELETE, OPTIONS")
            request.setResponseCode(204)
            return b""
        if path.startswith("/api/blobs/"):
            if method not in ("HEAD", "POST"):
                return _plain(request, 405, b"405 method not allowed")
            return self.blob(request, path.removeprefix("/api/blobs/"))
        if path in _GET_PATHS:
            if method not in ("GET", "HEAD"):
                return _plain(request, 405, b"405 method not allowed")
            return self.get(request, path)
        if path not in _POST_TYPES and path != "/api/delete":
            return _plain(request, 404, b"404 page not found")
        if method != ("DELETE" if path == "/api/delete" else "POST"):
            return _plain(request, 405, b"405 method not allowed")
        openai = path.startswith("/v1/")
        try:
            body = _decode(_content(request).read(), _POST_TYPES.get(path, "DeleteRequest"))
            return self.post(request, path, body)
        except _BadRequest as bad:
            return _error(request, bad.code, str(bad), openai)

    def get(self, request: Request, path: str) -> bytes:
        fake = self.fake
        if path == "/":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Ollama is running"
        if path == "/api/version":
            return _json(request, 200, {"version": fake.version})
        if path == "/api/tags":
            return _json(request, 200, {"models": [_model_entry(m) for m in fake.models]})
        if path == "/api/ps":
            return _json(request, 200, {"models": self.ps()})
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "library"}
                for m in fake.models]  # fmt: skip
        return _json(request, 200, {"object": "list", "data": data})

    def ps(self) -> list[JSONObject]:
        """/api/ps: the loaded models, the longest to stay first."""
        scheduler = self.fake.scheduler
        if scheduler is None:
            return []
        entries = []
        for runner in scheduler.runners.values():
            entry = _model_entry(runner.model)
            del entry["modified_at"]
            expires = scheduler.expires_at(runner)
            entry.update(expires_at=rfc3339(expires), size_vram=MODEL_SIZE,
                         context_length=scheduler.config.context_length)  # fmt: skip
            entries.append((expires, entry))
        entries.sort(key=lambda pair: -pair[0])
        return [entry for _, entry in entries]

    def blob(self, request: Request, digest: str) -> bytes:
        found = _DIGEST.fullmatch(digest)
        if found is None:
            return _json(request, 400, {"error": "invalid digest format"})
        hexdigest = found.group(1).lower()
        if request.method == b"HEAD":
            if hexdigest in self.fake.blobs:
                return b""
            return _json(request, 404, {"error": f'blob "{digest}" not found'})
        if hexdigest in self.fake.blobs:
            request.setResponseCode(200)
            return b""
        sha = hashlib.sha256()
        content = _content(request)
        content.seek(0)
        for piece in iter(lambda: content.read(1 << 20), b""):
            sha.update(piece)
        if sha.hexdigest() != hexdigest:
            got = "sha256:" + sha.hexdigest()
            return _json(
                request, 400, {"error": f'digest mismatch, expected "{digest}", got "{got}"'}
            )
        self.fake.blobs.add(hexdigest)
        request.setResponseCode(201)
        return b""

    def post(self, request: Request, path: str, body: JSONObject) -> Answer:
        fake = self.fake
        model = str(body.get("model") or body.get("name") or "")
        if path in _GENERATION_PATHS:
            return self.generation(request, path, body, model)
        if path == "/api/show":
            if not model:
                raise _BadRequest("model is required")
            if not fake.has(model):
                raise _BadRequest(f"model '{model}' not found", 404)
            return _json(request, 200, {"modelfile": "", "parameters": "", "template": "",
                                        "details": _details(), "model_info": {},
                                        "capabilities": ["completion"],
                                        "modified_at": CREATED})  # fmt: skip
        if path in ("/api/embed", "/api/embeddings"):
            return self.embed(request, path, body, model)
        if path == "/api/pull":
            return self.pull(request, body, model)
        if path == "/api/create":
            return self.create(request, body, model)
        if path == "/api/copy":
            source, destination = str(body.get("source") or ""), str(body.get("destination") or "")
            for role, name in (("source", source), ("destination", destination)):
                if not name:
                    raise _BadRequest(f'{role} "{name}" is invalid')
            if not fake.has(source):
                raise _BadRequest(f'model "{source}" not found', 404)
            fake.add(destination)
            request.setResponseCode(200)
            return b""
        # DELETE /api/delete
        if not model:
            raise _BadRequest('name "" is invalid')
        if not fake.has(model):
            raise _BadRequest(f"model '{model}' not found", 404)
        fake.remove(model)
        request.setResponseCode(200)
        return b""

    def embed(self, request: Request, path: str, body: JSONObject, model: str) -> Answer:
        if not model:
            raise _BadRequest("model is required")
        if not self.fake.has(model):
            raise _BadRequest(f'model "{model}" not found, try pulling it first', 404)
        if path == "/api/embeddings":
            inputs = [str(body.get("prompt") or "")]
        else:
            inputs = body.get("input") or []
            inputs = [str(i) for i in (inputs if isinstance(inputs, list) else [inputs])]
        vectors = [[float(len(text)), 0.5, -0.5] for text in inputs]
        if path == "/api/embeddings":
            answer: JSONObject = {"embedding": vectors[0] if inputs[0] else []}
        else:
            answer = {"model": model, "embeddings": vectors}
        scheduler = self.fake.scheduler
        if scheduler is None:
            return _json(request, 200, answer)
        tokens = [word for text in inputs for word in text.split()]
        job = Job(model, path, tokens, self._keep_alive(body), self.fake.now(), cache=False)
        prefill = len(tokens) * scheduler.config.prefill_seconds_per_token

        async def run(exchange: _Exchange) -> tuple[int, JSON] | None:
            await exchange.wait(self.fake._at(self.fake.now() + prefill))
            return 200, answer

        return self.scheduled(request, job, run)

    def scheduled(self, request: Request, job: Job, run: _Run, openai: bool = False) -> Answer:
        """Answer through the scheduler: wait for the start, ``run`` it, then free its place.

        ``run(exchange)`` writes the answer itself, or returns (code, body) for a JSON one;
        the client leaving cancels what it waits for and frees the slot at once.
        """
        fake = self.fake
        scheduler = fake.scheduler
        assert scheduler is not None
        try:
            scheduler.submit(job)
        except ServerBusy as busy:
            return _error(request, 503, str(busy), openai)
        exchange = _Exchange(fake, request)
        fake.open_streams += 1

        async def go() -> None:
            try:
                await exchange.wait(job.started)
                answer = await run(exchange)
                if answer is not None and not exchange.gone:
                    request.write(_json(request, *answer))
                    request.finish()
            except defer.CancelledError:
                pass
            finally:
                fake.open_streams -= 1
                record = job.record
                record.total = fake.now() - record.arrived
                if exchange.gone:
                    record.outcome = "gone"
                scheduler.release(job, exchange.cache)
                scheduler.records.append(record)

        defer.Deferred.fromCoroutine(go())
        return NOT_DONE_YET

    def _keep_alive(self, body: Mapping[str, JSON]) -> float | None:
        if body.get("keep_alive") is None:
            return None
        try:
            return keep_alive_seconds(body["keep_alive"])
        except ValueError as bad:
            raise _BadRequest(str(bad)) from None

    def generation(self, request: Request, path: str, body: JSONObject, model: str) -> Answer:
        fake = self.fake
        openai = path == "/v1/chat/completions"
        if openai and not body.get("messages"):
            raise _BadRequest("[] is too short - 'messages'")
        if not model:
            if path == "/api/generate":
                raise _BadRequest("model '' not found", 404)
            raise _BadRequest("model is required")
        if not fake.has(model):
            raise _BadRequest(f"model '{model}' not found", 404)
        keep_alive = self._keep_alive(body)
        empty = not (body.get("prompt") if path == "/api/generate" else body.get("messages"))
        if empty:
            return self.load(request, path, model, keep_alive)
        tokens = prompt_tokens(path, body)
        words = answer_words(path, body)
        stream = bool(body.get("stream")) if openai else body.get("stream") is not False
        if fake.scheduler is None and not stream:
            return _json(request, 200, self.whole(path, model, words, self.metrics(tokens, words)))
        if fake.scheduler is None:
            return self.unscheduled_stream(request, path, model, body, tokens, words)
        job = Job(model, path, tokens, keep_alive, fake.now())

        def run(exchange: _Exchange) -> Awaitable[tuple[int, JSON] | None]:
            return self.generate(request, path, model, body, job, words, exchange)

        return self.scheduled(request, job, run, openai)

    def load(self, request: Request, path: str, model: str, keep_alive: float | None) -> Answer:
        """A request with no prompt: Ollama loads the model, or unloads it with keep_alive 0."""
        scheduler = self.fake.scheduler
        reason = "unload" if keep_alive == 0 else "load"
        answer: JSONObject = {"model": model, "created_at": CREATED}
        if path == "/api/chat":
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer.update(done=True, done_reason=reason)
        if scheduler is None:
            return _json(request, 200, answer)
        if reason == "unload":
            scheduler.unload(model)
            scheduler.records.append(RequestRecord(model, path, self.fake.now(), outcome="unload"))
            return _json(request, 200, answer)
        job = Job(model, path, [], keep_alive, self.fake.now(), needs_slot=False)
        job.record.outcome = "load"

        async def run(exchange: _Exchange) -> tuple[int, JSON]:
            return 200, answer

        return self.scheduled(request, job, run)

    def metrics(
        self, tokens: list[str], words: list[str], job: Job | None = None, end: float = 0.0
    ) -> dict[str, int]:
        """The final chunk's counts and durations, in nanoseconds as Ollama gives them."""
        cached, load, total, prefill, per_token = 0, 0.0, 0.0, 0.0, 0.0
        scheduler = self.fake.scheduler
        if job is not None and scheduler is not None:
            cached = job.cached
            record = job.record
            assert job.ready_at is not None
            load, total = job.ready_at - record.arrived, end - record.arrived
            prefill = (len(tokens) - cached) * scheduler.config.prefill_seconds_per_token
            per_token = scheduler.config.token_seconds
        return {
            "total_duration": round(total * 1e9),
            "load_duration": round(load * 1e9),
            "prompt_eval_count": len(tokens),
            "prompt_eval_cached_count": cached,
            "prompt_eval_duration": round(prefill * 1e9),
            "eval_count": len(words),
            "eval_duration": round(len(words) * per_token * 1e9),
        }

    def chunk(self, path: str, model: str, word: str) -> bytes:
        """One streamed piece of the answer (NDJSON line or SSE event)."""
        if path == "/api/generate":
            line: JSONObject = {"model": model, "created_at": CREATED,
                                    "response": word + " ", "done": False}  # fmt: skip
        elif path == "/api/chat":
            line = {"model": model, "created_at": CREATED, "done": False,
                    "message": {"role": "assistant", "content": word + " "}}  # fmt: skip
        else:
            delta = {"role": "assistant", "content": word + " "}
            return _event(self._completion_chunk(model, delta, None))
        return json.dumps(line).encode() + b"\n"

    def tail(
        self, path: str, model: str, body: Mapping[str, JSON], metrics: dict[str, int]
    ) -> list[bytes]:
        """The pieces after the last word: Ollama's final line, or OpenAI's last events."""
        if path != "/v1/chat/completions":
            final = self.whole(path, model, [], metrics)
            return [json.dumps(final).encode() + b"\n"]
        events = [
            _event(self._completion_chunk(model, {"role": "assistant", "content": ""}, "stop"))
        ]
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage_chunk = self._completion_chunk(model, None, None)
            usage_chunk.update(choices=[], usage=_usage(metrics))
            events.append(_event(usage_chunk))
        return [*events, b"data: [DONE]\n\n"]

    def whole(self, path: str, model: str, words: list[str], metrics: dict[str, int]) -> JSONObject:
        """A non-streamed answer (or, with no words, the final NDJSON line)."""
        text = "".join(word + " " for word in words)
        if path == "/v1/chat/completions":
            message = {"role": "assistant", "content": text}
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                    "system_fingerprint": "fp_ollama", "choices": [{"index": 0,
                    "message": message, "finish_reason": "stop"}],
                    "usage": _usage(metrics)}  # fmt: skip
        answer: JSONObject = {"model": model, "created_at": CREATED}
        if path == "/api/generate":
            answer["response"] = text
        else:
            answer["message"] = {"role": "assistant", "content": text}
        answer.update(done=True, done_reason="stop", **metrics)
        return answer

    @staticmethod
    def _completion_chunk(model: str, delta: JSON, finish: str | None) -> JSONObject:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                "model": model, "system_fingerprint": "fp_ollama",
                "choices": [choice] if delta is not None else []}  # fmt: skip

    def unscheduled_stream(
        self,
        request: Request,
        path: str,
        model: str,
        body: Mapping[str, JSON],
        tokens: list[str],
        words: list[str],
    ) -> Answer:
        """Without scheduling: each piece after the fake's pacing or gate."""
        if path == "/v1/chat/completions":
            request.setHeader(b"Content-Type", b"text/event-stream")
        else:
            request.setHeader(b"Content-Type", b"application/x-ndjson")
        pieces = [self.chunk(path, model, w) for w in words]
        pieces += self.tail(path, model, body, self.metrics(tokens, words))
        fake = self.fake
        fake.open_streams += 1
        exchange = _Exchange(fake, request)

        async def run() -> None:
            try:
                for piece in pieces:
                    await exchange.wait(fake._before_chunk())
                    if exchange.gone:
                        return
                    request.write(piece)
                    fake.emitted += 1
                request.finish()
            except defer.CancelledError:
                pass
            finally:
                fake.open_streams -= 1

        defer.Deferred.fromCoroutine(run())
        return NOT_DONE_YET

    async def generate(
        self,
        request: Request,
        path: str,
        model: str,
        body: Mapping[str, JSON],
        job: Job,
        words: list[str],
        exchange: _Exchange,
    ) -> tuple[int, JSON] | None:
        """With scheduling, once started: prefill the uncached part, then a word per token."""
        fake = self.fake
        scheduler = fake.scheduler
        assert scheduler is not None and fake.clock is not None
        openai = path == "/v1/chat/completions"
        stream = bool(body.get("stream")) if openai else body.get("stream") is not False
        if stream:
            content_type = b"text/event-stream" if openai else b"application/x-ndjson"
            request.setHeader(b"Content-Type", content_type)
        record = job.record
        generated: list[str] = []
        exchange.cache = job.tokens[: job.cached]
        # Each step at its own time from the start, so that late timers do not add up.
        prefilled = (
            fake.now() + (len(job.tokens) - job.cached) * scheduler.config.prefill_seconds_per_token
        )
        await exchange.wait(fake._at(prefilled))
        exchange.cache = list(job.tokens)
        for n, word in enumerate(words, 1):
            await exchange.wait(fake._before_token(prefilled + n * scheduler.config.token_seconds))
            if exchange.gone:
                return None
            generated.append(word)
            exchange.cache = [*job.tokens, *generated]
            if record.first_token is None:
                record.first_token = fake.now() - record.arrived
            record.eval_count = len(generated)
            if stream:
                request.write(self.chunk(path, model, word))
                fake.emitted += 1
        metrics = self.metrics(job.tokens, generated, job, fake.now())
        if not stream:
            return 200, self.whole(path, model, generated, metrics)
        for piece in self.tail(path, model, body, metrics):
            request.write(piece)
            fake.emitted += 1
        request.finish()
        return None

    def pull(self, request: Request, body: JSONObject, model: str) -> Answer:
        """Ollama's pull: progress lines, then the model is here (or the manifest is not found)."""
        fake = self.fake
        if not model:
            raise _BadRequest("invalid model name")
        digest = "sha256:" + hashlib.sha256(full_name(model).encode()).hexdigest()
        if fake.pullable(model):
            lines: list[JSONObject] = [
                {"status": "pulling manifest"},
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": MODEL_SIZE},
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": MODEL_SIZE,
                 "completed": MODEL_SIZE},
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ]  # fmt: skip
            fake.add(model)
        else:
            lines = [{"status": "pulling manifest"}, {"error": PULL_ERROR}]
        return self.progress(request, body, lines)

    def create(self, request: Request, body: JSONObject, model: str) -> Answer:
        """Ollama's create from blobs it holds (``files``) or from a model (``from``)."""
        fake = self.fake
        files = body.get("files") or {}
        if not isinstance(files, dict):
            raise _BadRequest("json: cannot unmarshal into Go struct field CreateRequest.files")
        for name, digest in files.items():
            found = _DIGEST.fullmatch(str(digest))
            if found is None:
                raise _BadRequest(f"invalid digest for {name}: invalid digest format")
            if found.group(1).lower() not in fake.blobs:
                raise _BadRequest(
                    f"blob not found for {name} (digest {digest}): file does not exist"
                )
        if not model:
            raise _BadRequest("invalid model name")
        source = str(body.get("from") or "")
        if not files and not source:
            raise _BadRequest("neither 'from' or 'files' was specified")
        if source and not fake.has(source):
            if not fake.pullable(source):
                return self.progress(request, body, [{"status": "pulling manifest"},
                                                     {"error": PULL_ERROR}])  # fmt: skip
            fake.add(source)
        lines = [{"status": "parsing GGUF"}] if files else []
        lines += [{"status": "writing manifest"}, {"status": "success"}]
        fake.add(model)
        return self.progress(request, body, lines)

    def progress(
        self, request: Request, body: Mapping[str, JSON], lines: list[JSONObject]
    ) -> bytes:
        """Progress as Ollama streams it, or its last line (an error: 500) with stream false."""
        if body.get("stream") is False:
            last = lines[-1]
            return _json(request, 500 if "error" in last else 200, last)
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _event(data: JSON) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _usage(metrics: Mapping[str, int]) -> JSONObject:
    prompt, completion = metrics["prompt_eval_count"], metrics["eval_count"]
    usage: JSONObject = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}  # fmt: skip
    if metrics["prompt_eval_cached_count"]:
        usage["prompt_tokens_details"] = {"cached_tokens": metrics["prompt_eval_cached_count"]}
    return usage


def _seconds_or_duration(text: str) -> float:
    """OLLAMA_KEEP_ALIVE's forms: whole seconds or a Go duration; negative is forever."""
    try:
        seconds = float(int(text))
    except ValueError:
        try:
            seconds = go_duration(text)
        except ValueError as bad:
            raise argparse.ArgumentTypeError(str(bad)) from None
    return FOREVER if seconds < 0 else seconds


def _model_seconds(text: str) -> tuple[str, float]:
    model, _, seconds = text.rpartition("=")
    try:
        return model, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=SECONDS, got {text!r}") from None


def configure(
    argv: list[str] | None,
    env: Mapping[str, str],
    *,
    label: str = "simulated Ollama",
    models: list[str] | None = None,
    pace: float = 0.05,
) -> tuple[argparse.Namespace, Scheduling | None, OriginPolicy]:
    """The command line's options, its scheduling (None: instant) and the origin policy."""
    default_models = models if models is not None else [ECHO_MODEL]
    parser = argparse.ArgumentParser(description=f"Run a {label} on loopback (127.0.0.1).")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--version", default="0.12.0")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"a model to list (repeatable) [default: {', '.join(default_models)}]",
    )
    parser.add_argument(
        "--pace", type=float, default=pace, help=f"seconds between chunks [default: {pace:g}]"
    )
    group = parser.add_argument_group(
        "scheduling", "any of these schedules as Ollama does (defaults are Ollama's)"
    )
    group.add_argument("--max-loaded", type=int, help="models in memory at once [3]")
    group.add_argument("--num-parallel", type=int, help="slots per loaded model [1]")
    group.add_argument("--max-queue", type=int, help="waiting requests before 503 [512]")
    group.add_argument("--load-seconds", type=float, help="a model's load time [2]")
    group.add_argument("--model-load", type=_model_seconds, action="append", metavar="MODEL=S",
                       help="one model's load time (repeatable)")  # fmt: skip
    group.add_argument("--prefill-seconds", type=float, help="per prompt token not cached [0.005]")
    group.add_argument("--token-seconds", type=float, help="per generated token [0.05]")
    group.add_argument("--keep-alive", type=_seconds_or_duration,
                       help="seconds or a Go duration such as 5m; negative keeps [5m]")  # fmt: skip
    args = parser.parse_args(argv)
    args.model = args.model or default_models
    options = {
        "max_loaded": args.max_loaded,
        "num_parallel": args.num_parallel,
        "max_queue": args.max_queue,
        "load_seconds": args.load_seconds,
        "model_load_seconds": dict(args.model_load) if args.model_load else None,
        "prefill_seconds_per_token": args.prefill_seconds,
        "token_seconds": args.token_seconds,
        "keep_alive": args.keep_alive,
    }
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return args, Scheduling(**given) if given else None, OriginPolicy.from_env(env)
    except ValueError as bad:
        parser.error(f"OLLAMA_ORIGINS: {bad}" if "origin" in str(bad) else str(bad))


def main(
    argv: list[str] | None = None,
    *,
    label: str = "simulated Ollama",
    models: list[str] | None = None,
    pace: float = 0.05,
) -> None:
    """Serve a simulated Ollama on loopback until interrupted."""
    args, scheduling, origins = configure(argv, os.environ, label=label, models=models, pace=pace)
    from twisted.internet import reactor

    fake = FakeOllama(args.version, args.model, clock=reactor, record=False,
                      scheduling=scheduling, origins=origins)  # fmt: skip
    fake.pace = args.pace
    # (Twisted 26 types listenTCP's factory as a ServerFactory of exactly one protocol.)
    port = reactor.listenTCP(args.port, fake.site(), interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"{label} on http://127.0.0.1:{port.getHost().port}", flush=True)  # type: ignore[attr-defined]
    reactor.run()


SimulatedOllama = FakeOllama

__all__ = [
    "BUSY",
    "CREATED",
    "DEFAULT_MODELS",
    "ECHO_MODEL",
    "FOREVER",
    "FakeOllama",
    "Job",
    "ModelScheduler",
    "RequestRecord",
    "Runner",
    "Scheduling",
    "ServerBusy",
    "SimulatedOllama",
    "Slot",
    "configure",
    "full_name",
    "go_duration",
    "keep_alive_seconds",
    "prompt_tokens",
    "rfc3339",
]

if __name__ == "__main__":
    main()
