"""What a server tells clients of its Ollama's load: the state report and its header.

A server-mode node sends its report on every response it relays (``X-Ollana-State``),
the answers to clients' health checks included, so a client's view of each server is at
most one response old. The value is compact JSON::

    {"n": 1, "q": 512, "m": 3, "loaded": ["llama3.2:latest"],
     "models": {"llama3.2:latest": [2, 1]}}

``n`` is the slots per loaded model (OLLAMA_NUM_PARALLEL), ``q`` the most requests Ollama
queues (OLLAMA_MAX_QUEUE), ``m`` the most models it keeps loaded
(OLLAMA_MAX_LOADED_MODELS), ``loaded`` what /api/ps last listed, and ``models`` the
requests the server is relaying per model: in flight, and of those, waiting for the first
byte of their answer (queued, loading or evaluating the prompt). With a shared secret the
value ends with ``;`` and an HMAC-SHA256 of what comes before it (hex), keyed from the
secret, and a report without a good tag is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from dataclasses import dataclass, field

from zope.interface import implementer

from ollana.interfaces import IServerState

STATE_HEADER = b"x-ollana-state"
STATE_LABEL = b"ollana state report v1"
MAX_STATE_HEADER = 16 * 1024  # bytes: a longer value is not a report of ours
MAX_MODELS = 64  # models named in one report, at most: it must fit a response head

DEFAULT_PARALLEL = 1  # Ollama's defaults, where the environment says nothing
DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_LOADED = 3


@implementer(IServerState)
@dataclass(frozen=True)
class ServerState:
    """One server's report (see the module docstring)."""

    parallel: int = DEFAULT_PARALLEL
    max_queue: int = DEFAULT_MAX_QUEUE
    max_loaded: int = DEFAULT_MAX_LOADED
    loaded: frozenset[str] = frozenset()
    models: dict[str, tuple[int, int]] = field(default_factory=dict)  # in flight, waiting

    def in_flight(self, model: str) -> int:
        return self.models.get(model, (0, 0))[0]

    def waiting(self, model: str) -> int:
        return self.models.get(model, (0, 0))[1]

    def busy(self) -> int:
        return sum(counts[0] for counts in self.models.values())


def encode(state: ServerState, secret: bytes | None = None) -> bytes:
    """The header value of a report, signed when there is a secret."""
    report = {
        "n": state.parallel,
        "q": state.max_queue,
        "m": state.max_loaded,
        "loaded": sorted(state.loaded)[:MAX_MODELS],
        "models": {name: list(counts) for name, counts in list(state.models.items())[:MAX_MODELS]},
    }
    value = json.dumps(report, separators=(",", ":")).encode("ascii")
    if secret is not None:
        value += b";" + _tag(secret, value).encode("ascii")
    return value


@functools.lru_cache(maxsize=256)  # read on every answer; a server's value repeats
def decode(value: bytes, secret: bytes | None = None) -> ServerState | None:
    """The report a header value carries, or None when it is not a (good) report."""
    if len(value) > MAX_STATE_HEADER:
        return None
    if secret is not None:
        value, _, tag = value.rpartition(b";")
        if not hmac.compare_digest(tag, _tag(secret, value).encode("ascii")):
            return None
    try:
        report = json.loads(value)
        return ServerState(
            parallel=_count(report["n"], least=1),
            max_queue=_count(report["q"]),
            max_loaded=_count(report["m"], least=1),
            loaded=frozenset(_names(report["loaded"])),
            models={
                str(name): (_count(counts[0]), _count(counts[1]))
                for name, counts in list(dict(report["models"]).items())[:MAX_MODELS]
            },
        )
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):  # deep nesting
        return None


def _tag(secret: bytes, value: bytes) -> str:
    key = hmac.new(secret, STATE_LABEL, hashlib.sha256).digest()
    return hmac.new(key, value, hashlib.sha256).hexdigest()


def _count(value: object, least: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(value)
    return value


def _names(value: object) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(value)
    return [name for name in value[:MAX_MODELS] if isinstance(name, str)]
