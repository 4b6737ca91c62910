"""Ollana's own pages, under /ollana/ on the proxy's listener: a dashboard for people
(/ollana/), the status as JSON (api/status) and the Prometheus metrics (metrics). They
read their node through ollana.interfaces.INodeStatus.

The dashboard shows what api/status says, rendered with twisted.web.template, which escapes
every value (peer data comes from the network). It is one self-contained page: inline CSS,
no script, a meta refresh every few seconds. A server's status also has its Ollama's models
(its /api/tags, asked when the page is), under "models".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.template import Element, Flattenable, Tag, TagLoader, renderElement, tags
from twisted.web.util import redirectTo

from ollana.interfaces import JSON, INodeStatus, IServerState, JSONObject
from ollana.peers import Peer, host_port

log = Logger()
T = TypeVar("T")

REFRESH_SECONDS = 5
# Nothing from elsewhere, no script; only the inline style (defence in depth: values are
# escaped anyway).
DASHBOARD_POLICY = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def state_status(state: IServerState | None) -> JSONObject | None:
    """A server's load report as the status shows it, summed up: the slots of its loaded
    models busy and free, and the queue (the requests for a model that no slot holds:
    waiting for one, or for their model to load). Requests that named no model (the
    model "") count in neither."""
    if state is None:
        return None
    parallel, loaded = state.parallel, state.loaded
    busy = sum(min(state.in_flight(name), parallel) for name in loaded)
    queue = sum(
        max(0, in_flight - (parallel if name in loaded else 0))
        for name, (in_flight, _) in state.models.items()
        if name
    )
    return {
        "parallel": parallel,
        "max_queue": state.max_queue,
        "max_loaded": state.max_loaded,
        "loaded": sorted(loaded),
        "models": {
            name: {"in_flight": in_flight, "waiting": waiting}
            for name, (in_flight, waiting) in sorted(state.models.items())
        },
        "slots_busy": busy,
        "slots_free": parallel * len(loaded) - busy,
        "queue": queue,
    }


def model_entries(tags: JSON) -> list[JSONObject] | None:
    """The models of an Ollama's /api/tags answer as the status shows them (None when it is
    not a listing)."""
    listed = tags.get("models") if isinstance(tags, dict) else None
    if not isinstance(listed, list):
        return None
    return [
        {key: entry.get(key) for key in ("name", "size", "digest", "modified_at")}
        for entry in listed
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    ]


def full_status(node: INodeStatus) -> defer.Deferred[JSONObject]:
    """node.status(), with its Ollama's models for a server (None when its Ollama could not
    say). Never fails."""
    status = node.status()
    if status.get("mode") != "server":
        return defer.succeed(status)

    def listed(tags: JSON) -> JSONObject:
        return {**status, "models": model_entries(tags)}

    def unlisted(failure: Failure) -> JSONObject:
        return {**status, "models": None}

    return defer.maybeDeferred(node.ollama_models).addCallbacks(listed, unlisted)


def answer_later(
    request: Request, answering: defer.Deferred[T], write: Callable[[T], object]
) -> int:
    """Write what answering gives once it has (unless the client has gone): NOT_DONE_YET."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def written(result: T) -> None:
        if not gone:
            write(result)

    answering.addCallback(written).addErrback(lambda f: log.failure("Status page failed", f))
    return NOT_DONE_YET


def peer_status(peer: Peer, now: float) -> JSONObject:
    """One server as the status shows it."""
    return {
        "id": peer.key,
        "address": peer.host,
        "port": peer.port,
        "scheme": peer.scheme,
        "source": peer.source.value,
        "healthy": peer.healthy,
        "reason": peer.reason,
        "latency_ms": None if peer.latency is None else round(peer.latency * 1000, 1),
        "active_requests": peer.active,
        "total_requests": peer.total_requests,
        "failures": peer.failures,
        "models": sorted(peer.models),
        "last_seen": datetime.fromtimestamp(peer.last_seen, timezone.utc).isoformat(),
        "last_seen_s_ago": round(max(0.0, now - peer.last_seen), 1),
        "state": state_status(peer.state),
        "unreported": peer.unreported,
    }


class StatusPages(Resource):
    """/ollana/ for one node (what INodeStatus reads): the dashboard, api/status and
    metrics; /ollana itself redirects to /ollana/."""

    def __init__(self, node: INodeStatus) -> None:
        super().__init__()
        api = Resource()
        api.putChild(b"status", StatusJSON(node))
        self.putChild(b"", Dashboard(node))
        self.putChild(b"api", api)
        self.putChild(b"metrics", MetricsPage(node))

    def render_GET(self, request: Request) -> bytes:
        """/ollana without the slash: to the dashboard."""
        return redirectTo(b"/ollana/", request)


class _NodePage(Resource):
    """A leaf page about one node."""

    isLeaf = True

    def __init__(self, node: INodeStatus) -> None:
        super().__init__()
        self.node = node


class StatusJSON(_NodePage):
    """/ollana/api/status: node.status() as JSON."""

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")

        def write(status: JSONObject) -> None:
            request.write(json.dumps(status, indent=2).encode("utf-8") + b"\n")
            request.finish()

        return answer_later(request, full_status(self.node), write)


class MetricsPage(_NodePage):
    """/ollana/metrics: the node's registry in Prometheus' text format."""

    def render_GET(self, request: Request) -> bytes:
        # Here, not at the top: a node nobody scrapes never loads prometheus_client.
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.node.registry)


class Dashboard(_NodePage):
    """/ollana/: node.status() as an HTML page that refreshes itself."""

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", DASHBOARD_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")

        def write(status: JSONObject) -> None:
            renderElement(request, DashboardPage(status))

        return answer_later(request, full_status(self.node), write)


class DashboardPage(Element):
    """The dashboard for one status, as node.status() gives it."""

    def __init__(self, status: JSONObject) -> None:
        super().__init__(loader=TagLoader(page(status)))


# The page. Text and attribute values are escaped by the flattener; CSS, which it would
# escape too, must not contain <, > or &.

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:75em;padding:1em;
 color:#1d1d1f;background:#f7f7f8}
h1{font-size:1.4em;margin:0 0 .6em}
h2{font-size:1.1em;margin:1.6em 0 .5em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25em 1em;margin:0}
dt{color:#666}
dd{margin:0;overflow-wrap:anywhere}
.mode{font-size:.7em;vertical-align:middle;padding:.15em .6em;border-radius:1em;
 background:#e3e8f4;color:#2b4a8b;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.45em .6em;border-bottom:1px solid #ddd;vertical-align:top}
th{font-size:.85em;color:#666;font-weight:600;white-space:nowrap}
td{overflow-wrap:anywhere}
td.nowrap{white-space:nowrap}
.wide{overflow-x:auto}
.ok{color:#17702c;font-weight:600}
.bad{color:#b3261e;font-weight:600}
.reason{display:block;color:#666;font-size:.9em}
.empty{color:#666}
footer{margin-top:2em;color:#666;font-size:.85em}
@media (max-width:40em){
 thead{display:none}
 table,tbody,tr,td{display:block}
 table{background:none}
 tr{background:#fff;border:1px solid #ddd;border-radius:.5em;margin-bottom:.8em;padding:.3em}
 td,td.nowrap{border:0;padding:.2em .4em;display:grid;grid-template-columns:7.5em 1fr;gap:.5em;
  white-space:normal}
 td::before{content:attr(data-label);color:#666}
}
"""

PEER_COLUMNS = ("Server", "Source", "Health", "Latency", "Requests", "Failures", "Models",
                "Loaded", "Slots", "Queue", "Last seen")  # fmt: skip
WRAPPED = ("Health", "Models", "Loaded")  # columns whose values may be long


def page(status: JSONObject) -> Tag:
    """The whole page for a status."""
    mode = str(status["mode"])
    body = tags.body(
        tags.h1("Ollana ", tags.span(mode, class_="mode")),
        summary(status),
        ollama_section(status["ollama"], status.get("models"))
        if status.get("ollama") is not None
        else "",
        load_section(status["state"]) if status.get("state") is not None else "",
        peers_section(status["peers"]) if mode == "client" else "",
        tags.footer(
            f"Refreshes every {REFRESH_SECONDS} s. The same as JSON: ",
            tags.a("api/status", href="/ollana/api/status"),
            "; for Prometheus: ",
            tags.a("metrics", href="/ollana/metrics"),
            ".",
        ),
    )
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.meta(content=str(REFRESH_SECONDS), **{"http-equiv": "refresh"}),
        tags.link(rel="icon", href="data:,"),  # no request for /favicon.ico (it would be proxied)
        tags.title(f"Ollana: {mode} mode"),
        tags.style(CSS),
    )
    return tags.html(head, body, lang="en")


def summary(status: JSONObject) -> Tag:
    """The node itself: mode, id, version, uptime, listen address."""
    return tags.dl(
        entry("Mode", str(status["mode"])),
        entry("Node", tags.code(str(status["node_id"]))),
        entry("Version", str(status["version"])),
        entry("Up for", duration(float(status["uptime_s"]))),
        entry("Listening on", str(status["listen"])),
    )


def ollama_section(ollama: JSONObject, models: list[JSONObject] | None) -> Tag:
    """Server mode: the local Ollama's state and models."""
    version, healthy = ollama.get("version"), bool(ollama["healthy"])
    if models is None:
        listed = "- (the Ollama did not say)"
    else:
        listed = ", ".join(f"{m['name']} ({size(m.get('size'))})" for m in models) or "none"
    return tags.section(
        tags.h2("Local Ollama"),
        tags.dl(
            entry("URL", str(ollama["url"])),
            entry("State", health(healthy, "" if healthy else str(ollama.get("reason") or ""))),
            entry("Version", "-" if version is None else str(version)),
            entry("Models", listed),
        ),
    )


def size(value: JSON) -> str:
    """A size in bytes as Ollama shows it (decimal units: 2.0 GB)."""
    if not isinstance(value, int | float) or value < 0:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{int(value)} B"


def load_section(state: JSONObject) -> Tag:
    """Server mode: its Ollama's load, as it reports it to clients."""
    requests = [
        f"{name or '(no model named)'}: {counts['in_flight']} in flight, "
        f"{counts['waiting']} waiting"
        for name, counts in state["models"].items()
    ]
    return tags.section(
        tags.h2("Load"),
        tags.dl(
            entry("Loaded models", f"{loaded_models(state)} (at most {state['max_loaded']})"),
            entry("Slots", f"{slots(state)} ({state['parallel']} per model)"),
            entry("Queue", f"{state['queue']} (Ollama queues up to {state['max_queue']})"),
            entry("Requests", "; ".join(requests) or "none"),
        ),
    )


def peers_section(peers: list[JSONObject]) -> Tag:
    """Client mode: every known server, one row each."""
    title = tags.h2(f"Servers ({len(peers)})")
    if not peers:
        return tags.section(title, tags.p("No server known yet.", class_="empty"))
    head = tags.thead(tags.tr([tags.th(name) for name in PEER_COLUMNS]))
    table = tags.table(head, tags.tbody([peer_row(peer) for peer in peers]))
    return tags.section(title, tags.div(table, class_="wide"))


def peer_row(peer: JSONObject) -> Tag:
    """One server's row; each cell carries its column's name for narrow screens."""
    latency, state = peer.get("latency_ms"), peer.get("state")
    cells: tuple[Flattenable, ...] = (
        host_port(peer["address"], peer["port"]),
        str(peer["source"]),
        health(bool(peer["healthy"]), str(peer.get("reason") or "")),
        "-" if latency is None else f"{latency:g} ms",
        f"{peer['active_requests']} active, {peer['total_requests']} total",
        str(peer["failures"]),
        ", ".join(str(model) for model in peer["models"]) or "-",
        "-" if state is None else loaded_models(state),
        "-" if state is None else slots(state),
        "-" if state is None else str(state["queue"]),
        tags.time(
            f"{duration(float(peer['last_seen_s_ago']))} ago", datetime=str(peer["last_seen"])
        ),
    )
    return tags.tr([cell(name, value) for name, value in zip(PEER_COLUMNS, cells, strict=True)])


def cell(column: str, value: Flattenable) -> Tag:
    """A td named after its column (narrow screens show the name beside the value, a div);
    short values do not wrap."""
    td = tags.td(tags.div(value), **{"data-label": column})
    return td if column in WRAPPED else td(class_="nowrap")


def loaded_models(state: JSONObject) -> str:
    """The models a server reported loaded."""
    return ", ".join(str(name) for name in state["loaded"]) or "none"


def slots(state: JSONObject) -> str:
    """The slots of a server's loaded models, busy and free."""
    return f"{state['slots_busy']} busy, {state['slots_free']} free"


def entry(name: str, value: Flattenable) -> list[Tag]:
    """A name and its value in a dl."""
    return [tags.dt(name), tags.dd(value)]


def health(healthy: bool, reason: str) -> list[Flattenable]:
    """healthy or unhealthy, with the reason when there is one."""
    state = tags.span("healthy", class_="ok") if healthy else tags.span("unhealthy", class_="bad")
    return [state, [" ", tags.span(reason, class_="reason")] if reason else ""]


def duration(seconds: float) -> str:
    """A duration for people: 42 s, 3 min 5 s, 2 h 10 min, 4 d 3 h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"
