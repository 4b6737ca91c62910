"""The seams between Ollana's parts, as zope.interface interfaces (as twisted.names and
klein declare theirs): what a server reports of its Ollama's load, and how client mode
orders the servers for a request. Implementations say ``@implementer(...)``; tests check
them with ``verifyObject``.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IServerState(Interface):
    """What a server-mode node reports of its Ollama: slots, queue, loaded models, and
    the requests it is relaying per model."""

    parallel = Attribute("Slots of each loaded model (OLLAMA_NUM_PARALLEL).")
    max_queue = Attribute("Requests Ollama queues before it answers 503 (OLLAMA_MAX_QUEUE).")
    max_loaded = Attribute("Models Ollama keeps loaded at once (OLLAMA_MAX_LOADED_MODELS).")
    loaded = Attribute("The names of the loaded models (a frozenset of model keys).")
    models = Attribute("The requests relayed per model key: {model: (in flight, waiting)}.")

    def in_flight(model: str) -> int:
        """Requests for model being relayed now."""

    def waiting(model: str) -> int:
        """Of those, the ones still waiting for the first byte of their answer."""

    def busy() -> int:
        """Requests being relayed now, for any model."""


class IStateSource(Interface):
    """The server side of the report: what a server-mode node knows of its Ollama."""

    def report() -> IServerState:
        """The state now."""

    def header() -> bytes:
        """The state now, as the value of the X-Ollana-State header (signed if need be)."""


class IStrategy(Interface):
    """How client mode orders the servers for one request."""

    name = Attribute("The strategy's name, as --strategy takes it.")

    def order(model: str | None, key: str | None) -> list[tuple[Any, str]]:
        """The pool's peers to try for a request for model (a model key, or None) whose
        conversation has the affinity key (or None), best first, each with the reason it
        stands where it does ("affinity", "warm", "least-loaded", "cold", ...). (Any: the
        peers are ollana.peers.Peer, which this bottom module does not import.)"""

    def served(peer: object, model: str | None, key: str | None) -> None:
        """The peer answered that request: remember it for the conversation."""
