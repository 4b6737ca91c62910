"""The seams between Ollana's parts, as zope.interface interfaces (as twisted.names and
klein declare theirs): what a server reports of its Ollama's load, how client mode
orders the servers for a request, and the client's side that an exchange talks to.
Implementations say ``@implementer(...)``; tests check them with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
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


class IDownstream(IRequest):
    """The client's side of one proxied request, as its exchange (ollana.proxy) drives it:
    a twisted.web request (ollana.site's ProxyRequest) handed over once its head is in,
    while its body may still be coming. The exchange holds and releases the client as the
    upstream takes the body, relays the answer with a push producer, and aborts the
    connection when an answer breaks off."""

    request_line = Attribute(
        "The request line's (method, request-target, HTTP version), as bytes: there from "
        "the head on, while twisted.web sets method and uri only once the body is in."
    )
    code = Attribute("The response's status code.")
    startedWriting = Attribute("Whether the response's head has been written.")
    sentLength = Attribute("Bytes of the response body written so far.")
    finished = Attribute("Whether the response is finished.")

    def hold() -> None:
        """Stop reading from the client while the upstream takes no more of the body."""

    def release() -> None:
        """Read from the client again."""

    def abort() -> None:
        """End the client's connection abruptly: a truncated answer must not look whole."""

    def notifyFinish() -> Deferred[None]:
        """Fires once the response is finished; fails if the client leaves before."""

    def registerProducer(producer: IPushProducer, streaming: bool) -> None:
        """Relay the response body from producer, paused while the client reads no more."""

    def unregisterProducer() -> None:
        """The producer is done (before finish)."""


class IRouter(Interface):
    """Where a listener's requests go, as an exchange (ollana.proxy) asks it and reports
    to it: how to read a request for routing, the upstreams to try (or an answer made here),
    and each attempt's outcome: ``started`` and ``ended`` around it, and in between
    ``answered`` (its answer began) and one of ``succeeded``, ``failed`` (not reached) or
    ``errored`` (reached, but it failed the request). A router that finds an upstream down
    tells the watchers of the attempts under way there. (Any below: upstreams, plans,
    senders and watchers are ollana.upstream's, which this bottom module does not import.)
    """

    scan_limit = Attribute(
        "Bytes of a request body to scan for its model (and to keep for retries); 0: none."
    )

    def listing(method: bytes, path: bytes) -> Any:
        """What answers this request here instead of an upstream (a callable giving a
        Deferred answer), if anything does; else None."""

    def plans(method: bytes, path: bytes) -> str | None:
        """Whether plan() routes this request (model management): "at once" (from its
        head) or "with body" (once its small body is in); None if it does not."""

    def plan(method: bytes, path: bytes, headers: Headers, body: bytes | None, send: Any) -> Any:
        """Where a request that plans() names goes, given its whole body (None: not read,
        or too large): the upstreams to try, or a Deferred answer made here from copies of
        the request that send sends."""

    def wants_model(method: bytes, path: bytes) -> bool:
        """Whether the request's body may name the model that decides where it goes."""

    def wants_key(method: bytes, path: bytes) -> bool:
        """Whether the request's body (when small) may give a conversation affinity key."""

    def admits(model: str | None, headers: Headers) -> bool:
        """Whether to pass the request on now; False when it would only wait in the
        upstream's queue and the client said it may go elsewhere."""

    def candidates(model: str | None, key: str | None = None) -> list[Any]:
        """The upstreams to try for a request for model with affinity key, in order (at
        least one); NoUpstream if there is none."""

    def warm(upstream: Any) -> bool:
        """Whether upstream is thought to have its request's model loaded, with a slot free
        or about to be: worth trying before queueing where every slot is taken."""

    def lists(upstream: Any, model: str) -> bool:
        """Whether upstream is worth asking for model after another answered 404."""

    def missing(model: str, asked: Sequence[str]) -> str | None:
        """What to add to a 404 for model from the upstreams asked, if anything."""

    def response_headers() -> Sequence[tuple[bytes, bytes]]:
        """Headers added to every answer relayed from an upstream."""

    def started(upstream: Any, watcher: Any) -> None:
        """A request to upstream begins; watcher hears if upstream is found down."""

    def answered(upstream: Any, watcher: Any, headers: Headers) -> None:
        """The upstream's answer to the request has begun (its head, any status)."""

    def succeeded(upstream: Any) -> None:
        """Upstream answered a request, with an answer it is not to blame for."""

    def failed(upstream: Any, reason: str) -> None:
        """A request could not reach upstream (refused, reset, timed out connecting)."""

    def errored(upstream: Any, reason: str) -> None:
        """Upstream was reached but failed a request (a server error, or no answer in time)."""

    def ended(upstream: Any, watcher: Any) -> None:
        """That request has ended, however it ended."""


# A value as json.loads gives it. (Any: a dict, list, str, number, bool or None, which the
# code that reads it checks; a recursive union would need a check at every step instead.)
JSON = Any
JSONObject = dict[str, JSON]  # a JSON object, such as a node's status


class INodeStatus(Interface):
    """What Ollana's own pages (ollana.status) read of the node they belong to."""

    registry = Attribute("The node's prometheus_client CollectorRegistry: /ollana/metrics.")

    def status() -> JSONObject:
        """What the node is doing now, as /ollana/api/status shows it."""

    def ollama_models() -> Deferred[JSON]:
        """Its local Ollama's /api/tags answer, for a server-mode node's status."""
