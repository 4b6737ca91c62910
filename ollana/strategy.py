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
AFFINITY, WARM, SHORT_QUEUE, COLD_IDLE, DEEP_QUEUE, COLD, FAILING = range(7)
REASONS = {
    AFFINITY: "affinity",
    WARM: "warm",
    SHORT_QUEUE: "least-loaded",
    COLD_IDLE: "cold",
    DEEP_QUEUE: "least-loaded",
    COLD: "cold",
    FAILING: "failing",
}

# Routes to a server with the model loaded and few waiting, where a request is worth trying
# before queueing at a full one (upstream.QUEUE_HEADER).
WARM_ROUTES = frozenset({REASONS[AFFINITY], REASONS[WARM], REASONS[SHORT_QUEUE]})
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
        views = [_View(peer) for peer in peers]
        copies: dict[str, int] = {}  # on how many servers each model is resident
        for view in views:
            for name in view.resident:
                copies[name] = copies.get(name, 0) + 1
        ranked = sorted(
            ((FAILING if self.pool.recently_failed(view.peer) else
              view.tier(model, home, copies), view.load(model, copies), view.peer.key, view.peer)
             for view in views),
            key=lambda entry: entry[:3],
        )  # fmt: skip
        if ranked[0][0] != FAILING:  # servers that just failed are not tried at all
            ranked = [entry for entry in ranked if entry[0] != FAILING]
        best = [entry for entry in ranked if entry[0] == ranked[0][0]]
        if len(best) > 1:
            first, second = self._rng.sample(best, 2)
            # Load alone decides between the two drawn, not the name nor a check latency
            # that differs by noise: a tie goes to the first drawn, at random.
            chosen = min(first, second, key=lambda entry: (entry[0], entry[1][:3]))
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


class _View:
    """One server as a client sees it now: its last report, plus the requests this
    client sent it since."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.state: IServerState | None = peer.state
        self.sent = peer.unreported_models
        state = self.state
        loaded = set(state.loaded) if state is not None else set()
        # Models its requests wait for: resident soon, if there is room for all of them;
        # if not, they evict each other, and none of them counts as resident.
        pending = {name for name in self.sent if self.sent[name]}
        if state is not None:
            pending |= {name for name in state.models if state.in_flight(name)}
        pending -= loaded
        room = state.max_loaded if state is not None else 1
        if len(loaded | pending) <= room:
            self.resident = loaded | pending
        elif len(pending) <= room:
            self.resident = pending  # what its queue waits for replaces what is loaded
        else:
            self.resident = set()  # its queue wants more models than it holds: thrashing
        self.parallel = state.parallel if state is not None else 1
        self.busy = (self.state.busy() if self.state is not None else 0) + peer.unreported

    def in_flight(self, model: str) -> int:
        reported = self.state.in_flight(model) if self.state is not None else 0
        return reported + self.sent.get(model, 0)

    def tier(self, model: str | None, home: str | None, copies: dict[str, int]) -> int:
        if model is None:
            return SHORT_QUEUE if self.state is not None else COLD
        if model in self.resident:
            queued = self.in_flight(model) - self.parallel
            if queued < 0:
                return AFFINITY if self.peer.key == home else WARM
            return SHORT_QUEUE if queued < 1 else DEEP_QUEUE  # someone waits there: deep
        if self.busy:
            return COLD  # a load there waits for what it runs, and holds up what follows
        room = self.state is None or len(self.resident) < self.state.max_loaded
        spare = all(copies.get(name, 0) > 1 for name in self.resident)
        return COLD_IDLE if room or spare else COLD  # never evict a model's last copy early

    def load(self, model: str | None, copies: dict[str, int]) -> tuple[float, int, int, float]:
        """How loaded it is, for ties: its model's requests per slot, all its requests,
        the models only it has (what a load there would evict), then its check latency."""
        mine = self.in_flight(model) if model is not None else 0
        alone = sum(1 for name in self.resident if name != model and copies.get(name, 0) == 1)
        latency = self.peer.latency if self.peer.latency is not None else float("inf")
        return (mine / self.parallel, self.busy, alone, latency)


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
