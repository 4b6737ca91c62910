"""Client mode's merged listings: GET /api/tags, /api/ps and /v1/models answered with the
union over the healthy servers, in Ollama's own JSON shapes, each model once. Entries of
/api/tags and /api/ps also say which servers list them (SERVERS_FIELD, which Ollama's
clients ignore). Each server's listing is bounded (LISTING_LIMIT bytes, its first
MAX_MODELS entries), so a merge stays small whatever a server lists."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ollana.health import HTTPGetter, OllamaProbe
from ollana.interfaces import JSON, JSONObject
from ollana.peers import Peer, PeerPool, model_key
from ollana.upstream import Listing, LocalAnswer, NoUpstream, UpstreamsFailed

# path: (the key of the list in the answer, the key that names an entry)
MERGED = {
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
    "/v1/models": ("data", "id"),
}
SERVERS_FIELD = "ollana_servers"  # in /api/tags and /api/ps entries: the servers listing it


class MergedListings:
    """Asks every healthy server for a listing and merges the answers (OllamaProbe bounds
    each one)."""

    def __init__(self, pool: PeerPool, http: HTTPGetter, clock: IReactorTime, timeout: float):
        self.pool = pool
        self._http = http
        self._clock = clock
        self.timeout = timeout

    def lookup(self, method: bytes, target: bytes) -> Listing | None:
        """What answers GET target here, when it is a merged listing."""
        path = target.partition(b"?")[0].decode("ascii", "replace")
        if method != b"GET" or path not in MERGED:
            return None
        return lambda: defer.Deferred.fromCoroutine(self.answer(path))

    async def answer(self, path: str) -> LocalAnswer:
        """The merged listing, from the servers that answered in time."""
        peers = self.pool.candidates("fastest")  # the healthy ones, or else the rest
        if not peers:
            raise NoUpstream(self.pool.why_none())
        probes = [OllamaProbe(self._http, self._clock, peer.url) for peer in peers]
        asked = [probe.json(path, self.timeout) for probe in probes]
        results = await defer.DeferredList(asked, consumeErrors=True)
        list_key, name_key = MERGED[path]
        merged: list[JSON] = []
        names: dict[str, list[str]] = {}  # name: the servers listing it
        answered: list[Peer] = []
        reasons: list[str] = []
        for peer, probe, (ok, value) in zip(peers, probes, results, strict=True):
            listed = _listed(value, list_key) if ok else None
            if listed is None:
                why = value.getErrorMessage() if isinstance(value, Failure) else "no listing"
                reasons.append(f"{peer.url}: {why}")
                continue
            entries = [entry for entry in probe.first(listed, path) if isinstance(entry, dict)]
            answered.append(peer)
            named = [(entry.get(name_key), entry) for entry in entries]
            if path == "/api/tags":  # a fresh inventory, as good as the checker's
                peer.models = frozenset(model_key(n) for n, _ in named if isinstance(n, str))
                peer.models_checked = self._clock.seconds()
            for name, entry in named:
                if not isinstance(name, str):  # odd, but not ours to drop
                    merged.append(entry)
                elif name in names:
                    names[name].append(peer.address)
                else:
                    names[name] = [peer.address]
                    merged.append(entry)
        if not answered:
            raise UpstreamsFailed("ollana: no server could answer: " + "; ".join(reasons))
        if path != "/v1/models":
            merged = [
                {**entry, SERVERS_FIELD: sorted(names[entry[name_key]])}
                if isinstance(entry.get(name_key), str) else entry
                for entry in merged
            ]  # fmt: skip
        listing: JSONObject = {list_key: merged}
        if path == "/v1/models":
            listing = {"object": "list", **listing}
        servers = ", ".join(peer.address for peer in answered)
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"x-ollana-peer", servers.encode("utf-8")),
        ]
        return LocalAnswer(200, headers, json.dumps(listing).encode("utf-8"))


def _listed(answer: JSON, list_key: str) -> list[JSON] | None:
    """The listing's list of entries, or None when the answer is not a listing."""
    listed = answer.get(list_key) if isinstance(answer, dict) else None
    return listed if isinstance(listed, list) else None
