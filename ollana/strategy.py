"""How client mode orders the servers for a request (``--strategy``).

``LeastWait`` (``ttft``, the default) orders them by what decides a user's time to first
token, from the state each server reports (ollana.state) and this client's own requests
since: first the server that served this conversation before, if a slot of the model is
free there (its prompt cache makes the turn near-instant); then servers with the model
loaded and a slot free; then warm servers whose queue is short; then an idle server that
can load the model without evicting one; then warm servers with a deep queue; then the
rest. Among equals two are drawn at random and the less loaded one goes first (the power
of two choices), so that clients that do not see each other's requests do not all pile
onto one server. Affinity gives way to load: a busy server that holds the conversation is
passed over for a free one.

``Classic`` wraps the pool's older orders: ``fastest``, ``least-connections`` and
``round-robin``.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from zope.interface import implementer

from ollana.interfaces import IServerState, IStrategy
from ollana.peers import Peer, PeerPool

DEFAULT = "ttft"
STRATEGIES = (DEFAULT, "fastest", "least-connections", "round-robin")
AFFINITY_MEMORY = 4096  # conversations remembered (least recently served forgotten first)

# Tiers, best first, each with the reason a server in it is chosen (X-Ollana-Route).
AFFINITY, WARM, SHORT_QUEUE, COLD_IDLE, DEEP_QUEUE, COLD = range(6)
REASONS = {
    AFFINITY: "affinity",
    WARM: "warm",
    SHORT_QUEUE: "least-loaded",
    COLD_IDLE: "cold",
    DEEP_QUEUE: "least-loaded",
    COLD: "cold",
}

Choice = tuple[Peer, str]


@implementer(IStrategy)
class LeastWait:
    """Least expected wait for the first token (see the module docstring)."""

    name = DEFAULT

    def __init__(self, pool: PeerPool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self._rng = rng or random.Random()
        self._served: OrderedDict[str, str] = OrderedDict()  # affinity key: peer key

    def order(self, model: str | None, key: str | None) -> list[Choice]:
        peers, healthy = self.pool.eligible(model)
        if not healthy:
            return [(peer, "unhealthy") for peer in peers]
        home = self._served.get(key) if key is not None else None
        ranked = sorted(
            ((self._tier(peer, model, home), _load(peer, model), peer.key, peer) for peer in peers),
            key=lambda entry: entry[:3],
        )
        best = [entry for entry in ranked if entry[0] == ranked[0][0]]
        if len(best) > 1:
            first, second = self._rng.sample(best, 2)
            chosen = min(first, second, key=lambda entry: entry[:3])
            ranked.remove(chosen)
            ranked.insert(0, chosen)
        return [(peer, REASONS[tier]) for tier, _, _, peer in ranked]

    def served(self, peer: object, model: str | None, key: str | None) -> None:
        if key is None or not isinstance(peer, Peer):
            return
        self._served[key] = peer.key
        self._served.move_to_end(key)
        if len(self._served) > AFFINITY_MEMORY:
            self._served.popitem(last=False)

    def _tier(self, peer: Peer, model: str | None, home: str | None) -> int:
        state: IServerState | None = peer.state
        if state is None or model is None:
            return SHORT_QUEUE if state is not None else COLD
        if model in state.loaded:
            queued = state.in_flight(model) + peer.unreported - state.parallel
            if queued < 0:
                return AFFINITY if peer.key == home else WARM
            return SHORT_QUEUE if queued < state.parallel else DEEP_QUEUE
        idle = state.busy() + peer.unreported == 0
        return COLD_IDLE if idle and len(state.loaded) < state.max_loaded else COLD


def _load(peer: Peer, model: str | None) -> tuple[float, int, float]:
    """How loaded a server is, for ties: its model's requests per slot, all its requests,
    then its check latency."""
    state: IServerState | None = peer.state
    latency = peer.latency if peer.latency is not None else float("inf")
    if state is None:
        return (float(peer.active), peer.active, latency)
    mine = (state.in_flight(model) if model is not None else 0) + peer.unreported
    return (mine / state.parallel, state.busy() + peer.unreported, latency)


@implementer(IStrategy)
class Classic:
    """The pool's own orders, which know nothing of the servers' load."""

    def __init__(self, pool: PeerPool, name: str) -> None:
        self.pool = pool
        self.name = name

    def order(self, model: str | None, key: str | None) -> list[Choice]:
        return [(peer, self.name) for peer in self.pool.candidates(self.name, model)]

    def served(self, peer: object, model: str | None, key: str | None) -> None:
        pass


def strategy(pool: PeerPool, name: str, rng: random.Random | None = None) -> IStrategy:
    """The strategy called name (one of STRATEGIES)."""
    if name == DEFAULT:
        return LeastWait(pool, rng)
    return Classic(pool, name)
