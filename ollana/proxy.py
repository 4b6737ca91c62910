"""The streaming reverse proxy: one exchange per request, both directions flowing as they
arrive, with backpressure. ``Exchange`` chooses the upstream (after a bounded look at the
body for its model), streams the body up through ``RequestBody``, retries before the first
response byte, and relays the answer through ``ResponseRelay``, registered as the client
response's push producer. The listener's side (requests, channel, site) is ollana.site;
where requests go and the upstream agent, ollana.upstream; which headers pass, the targets
passed on and the error answers, ollana.messages; the access line, ollana.access; the idle
timeout, ollana.idle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone  # not client.X: a slow module proxy
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

from ollana.access import access, log_text
from ollana.affinity import KEY_LIMIT, conversation_key
from ollana.gate import Gate
from ollana.idle import IdleTimer
from ollana.interfaces import IDownstream, IRouter
from ollana.management import Copies, read_tail, with_note
from ollana.messages import VIA, BadTarget, end_to_end, error_body, error_kind, origin_form
from ollana.metrics import Metrics
from ollana.modelscan import ModelScanner
from ollana.upstream import (
    ERROR_HEADER,
    QUEUE_HEADER,
    RETRY_ELSEWHERE,
    WITH_BODY,
    Busy,
    LocalAnswer,
    NoUpstream,
    Sent,
    Upstream,
    UpstreamsFailed,
    describe_error,
)

log = Logger()

CLIENT_CLOSED = 499  # the status logged for a request whose client left before an answer
# Upstream answers that count against it (a server error), though they are relayed as they
# are (not 501: not implemented is no fault). Ollama's 503 ("server busy": its queue is
# full) counts too, so that a server that refuses everything at once is left out, and is
# tried elsewhere, as it never started.
SERVER_ERRORS = frozenset({500, 502, 503, 504})
STALLED = 5.0  # seconds a stream may have been silent when its upstream is found down
GENERATIONS = frozenset({b"/api/generate", b"/api/chat"})  # NDJSON, with a final chunk
NOTE_LIMIT = 64 * 1024  # bytes of a 404 read to add a note to its message


@implementer(IBodyProducer)
class RequestBody:
    """The client's request body, passed to the upstream as it arrives.

    While the upstream is not ready or cannot take more, incoming chunks wait here and
    the client is held (not read from), so at most a read or two is ever kept.
    ``upstream_owes`` tells the exchange whether it is the upstream that keeps the body
    from moving on, which is when the idle timeout counts.
    """

    def __init__(
        self,
        length: int | None,
        client: IDownstream,
        upstream_owes: Callable[[bool], None],
        received: Sequence[bytes] = (),
        complete: bool = False,
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._client = client
        self._upstream_owes = upstream_owes
        self._consumer: IConsumer | None = None
        self._waiting: list[bytes] = list(received)  # what came before this attempt
        self._paused = False
        self._complete = complete
        self._discarding = False
        self._done: defer.Deferred[None] | None = None

    @property
    def unfinished(self) -> bool:
        """Whether the upstream still expects more of the body than it got."""
        return not self._discarding and (self._waiting != [] or not self._complete)

    # From the client side (the Exchange).

    def received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is None or self._paused or self._waiting:
            self._waiting.append(data)
            self._client.hold()
        else:
            self._consumer.write(data)

    def completed(self) -> None:
        self._complete = True
        self._maybe_done()

    def discard(self) -> None:
        """The upstream will not read (more of) the body: drop it instead of holding it.

        The body is then never reported as written: the upstream connection, short of
        its body, is closed rather than reused."""
        self._discarding = True
        self._done = None
        self._waiting = []
        self._upstream_owes = _owes_nothing  # (see _maybe_done)
        self._client.release()

    def abandon(self) -> None:
        """The upstream answered before it read the whole body: drop the rest, and the
        connection, which would otherwise stay open waiting for the body."""
        self.discard()
        abort = getattr(self._consumer, "abort", None)  # ollana.httpclient.BodyWriter's
        if abort is not None:
            abort()

    # IBodyProducer, driven by the upstream connection.

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._consumer = consumer
        done: defer.Deferred[None] = defer.Deferred()
        self._done = done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        if self._discarding:
            return
        self._upstream_owes(True)
        if self._waiting:
            self._client.hold()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._discarding:
            return
        self._upstream_owes(False)
        self._flush()

    def stopProducing(self) -> None:
        self.discard()

    def _flush(self) -> None:
        while self._waiting and not self._paused and self._consumer is not None:
            self._consumer.write(self._waiting.pop(0))
        if not self._waiting and not self._paused:
            self._client.release()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._complete and not self._waiting and self._done is not None:
            done, self._done = self._done, None
            self._upstream_owes(True)  # now the answer is the upstream's to give
            # Sent: its pauses no longer say who owes what; and it lets go of the exchange
            # (whose method this is), which keeps it.
            self._upstream_owes = _owes_nothing
            done.callback(None)


def _owes_nothing(owes: bool) -> None:
    """What a request body that is sent or dropped tells the exchange: nothing."""


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """Writes the upstream's response body to the client as it arrives.

    It is also the client response's push producer: the client's backpressure pauses
    the upstream connection, and the exchange learns that the wait is not the upstream's.
    """

    def __init__(self, exchange: Exchange) -> None:
        self._exchange: Exchange | None = exchange  # until the body has ended
        self.paused = False

    @property
    def finished(self) -> bool:
        """Whether the upstream's body has ended."""
        return self._exchange is None

    def connectionMade(self) -> None:
        assert self._exchange is not None
        self._exchange.relaying(self)

    def dataReceived(self, data: bytes) -> None:
        assert self._exchange is not None
        self._exchange.chunk(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The exchange keeps the relay; the relay lets go of the exchange, so that neither
        # waits for the cyclic collector.
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.upstream_ended(reason)

    def pauseProducing(self) -> None:
        self.paused = True
        if self._exchange is not None:
            self.connection.pauseProducing()
            self._exchange.upstream_owes(False)

    def resumeProducing(self) -> None:
        self.paused = False
        if self._exchange is not None:
            self.connection.resumeProducing()
            self._exchange.upstream_owes(True)

    def stopProducing(self) -> None:
        """Drop the upstream connection (the client left, or the upstream went idle)."""
        if not self.finished and self.transport is not None:
            self.connection.stopProducing()

    @property
    def connection(self) -> IPushProducer:
        """The upstream connection (a push producer, as every TCP transport is)."""
        return self.transport  # type: ignore[return-value]


class Exchange:
    """One proxied request, from the client's headers to the end of the upstream's body.

    The upstream is chosen once the request says enough: at once, or, for a body that may
    name a model, once a bounded prefix has shown it; for model management, by what the
    router plans from the request (once its small body is in). While the body sent so far
    fits that prefix, an upstream that fails before answering is replaced by the next
    candidate.
    """

    _whole = False  # the body is read whole before the router plans where it goes
    _not_found: tuple[str, ...] = ()  # the servers that said 404 for the request's model
    client_gone = False
    timed_out = False
    _waited = 0.0  # how long the upstream had owed us when it timed out
    down: str | None = None  # why the upstream was found down during the attempt
    awaiting_head = False  # the attempt has sent its request and awaits the answer
    responding = False
    relay: ResponseRelay | None = None
    upstream: Upstream | None = None
    body: RequestBody | None = None
    scanner: ModelScanner | None = None
    _keyed: str | None = None  # the model found, while the key's body comes in
    _queue_at: Upstream | None = None  # the first server that said busy
    _stall_check: IDelayedCall | None = None  # a stream's, once its upstream is down
    _may_queue_elsewhere = False  # this attempt said QUEUE_HEADER
    _tail: tuple[bytes, bytes] | None = None  # the last two chunks of a generation
    _received_size = 0
    _active: Upstream | None = None
    # What the exchange waits on now: an attempt, an answer made here, or a 404's body.
    _pending: (
        defer.Deferred[IResponse] | defer.Deferred[LocalAnswer] | defer.Deferred[bytes] | None
    ) = None
    _answer: IResponse | None = None
    _cancelled = False
    first_byte: float | None = None
    bytes_in = 0
    _counted = False

    def __init__(self, proxy: ProxySettings, request: IDownstream, length: int | None) -> None:
        # (What every exchange starts with is set on the class, below the docstring: an
        # assignment less per field and request.)
        self.proxy = proxy
        self.router = proxy.router
        self.request = request
        self.length = length
        self.client_complete = length == 0
        first = min(proxy.idle_timeout, proxy.first_byte_timeout)
        self._idle = IdleTimer(proxy.clock, first, self._limit, self._went_idle)
        self.candidates: list[Upstream] = []
        self.reasons: list[str] = []
        self._received: list[bytes] | None = []  # the body so far, while it can be resent
        self.arrived = proxy.clock.seconds()
        proxy.metrics.started()
        self.response: defer.Deferred[IResponse | LocalAnswer] = defer.Deferred(self._cancel)
        request.notifyFinish().addCallbacks(self._request_done, self._client_left)
        self.method, self.uri, _ = request.request_line  # before twisted.web sets method, uri
        try:
            self.uri = origin_form(self.uri)
        except BadTarget as e:
            self._give_up(e)
            return
        listing = self.router.listing(self.method, self.uri)
        planned = self.router.plans(self.method, self.uri) if listing is None else None
        if listing is not None:
            self._pending = listing()
            self._pending.addCallbacks(self._settle, self._settle_failed)
        elif planned is not None:
            if planned == WITH_BODY and length != 0 and self.router.scan_limit > 0:
                self._whole = True
            else:
                self._plan(b"" if planned == WITH_BODY and length == 0 else None)
        elif (length != 0 and self.router.scan_limit > 0
              and self.router.wants_model(self.method, self.uri)):  # fmt: skip
            self.scanner = ModelScanner(self.router.scan_limit)
        else:
            self._choose(None)

    # Choosing and trying upstreams.

    def _scanned(self, model: str | None) -> None:
        """The scan found the model (or none): choose now, or, for the turn of a
        conversation, once its (small) body is in and gives the affinity key."""
        self.scanner = None
        if (model is not None and not self.client_complete and self._received is not None
                and self._received_size <= KEY_LIMIT
                and self.router.wants_key(self.method, self.uri)):  # fmt: skip
            self._keyed = model
        else:
            self._choose(model, self._key(model))

    def _key(self, model: str | None) -> str | None:
        if (model is None or self._received is None or self._received_size > KEY_LIMIT
                or not self.router.wants_key(self.method, self.uri)):  # fmt: skip
            return None
        return conversation_key(self.uri, model, b"".join(self._received))

    def _choose(self, model: str | None, key: str | None = None) -> None:
        self.scanner = None
        self._keyed = None
        if not self.router.admits(model, self.request.requestHeaders):
            self._give_up(Busy("ollana: every slot for this model is taken here"))
            return
        try:
            self.candidates = self.router.candidates(model, key)
        except NoUpstream as e:
            self._give_up(e)
            return
        except Exception:
            log.failure("Choosing an upstream failed")
            self._give_up(NoUpstream("ollana: internal error choosing a server"))
            return
        self._attempt()

    def _plan(self, body: bytes | None) -> None:
        """Route the request by what it is (model management, which the router plans from
        its whole body, or None): upstreams to try as usual, or an answer made here from
        copies of it sent to several servers."""
        self._whole = False
        copies = Copies(self.proxy.agent, self.proxy.clock, self.proxy.first_byte_timeout,
                        self.proxy.idle_timeout)  # fmt: skip

        def send(upstream: Upstream) -> defer.Deferred[Sent]:
            return copies.send(upstream, self.method, self.uri, self._upstream_headers(),
                               body or b"")  # fmt: skip

        try:
            plan = self.router.plan(self.method, self.uri, self.request.requestHeaders, body,
                                    send)  # fmt: skip
        except (NoUpstream, BadTarget) as e:
            self._give_up(e)
            return
        except Exception:
            log.failure("Choosing an upstream failed")
            self._give_up(NoUpstream("ollana: internal error choosing a server"))
            return
        if isinstance(plan, list):
            self.candidates = plan
            self._attempt()
        else:
            self._pending = plan
            plan.addCallbacks(self._settle, self._settle_failed)

    def _attempt(self) -> None:
        upstream = self.candidates.pop(0)
        self.upstream = upstream
        self.timed_out = False
        self.down = None
        self.awaiting_head = True
        self._active = upstream
        self.router.started(upstream, self)
        if self.length == 0:
            self.body = None
            self.upstream_owes(True)
        else:
            self.body = RequestBody(self.length, self.request, self.upstream_owes,
                                    self._received or (), self.client_complete)  # fmt: skip
            if self._received_size > self.router.scan_limit:
                self._received = None  # too much to keep for another attempt
        try:
            url = upstream.url.encode("ascii") + self.uri
            attempt = self.proxy.agent.request(self.method, url, self._upstream_headers(),
                                               self.body)  # fmt: skip
        except Exception:
            attempt = defer.fail()
        self._pending = attempt
        attempt.addCallbacks(self._answered, self._attempt_failed)

    def _answered(self, response: IResponse) -> None:
        """The upstream answered: whatever of the body it has not read, it never will, so
        the client may send the rest (dropped) and get its answer. An Ollana server's own
        error (it could not serve the request) is tried on the next candidate instead."""
        self._pending = None
        self.awaiting_head = False
        if self.body is not None and self.body.unfinished:
            self.body.abandon()
            self.upstream_owes(False)  # until the client has sent the rest
        if self.response.called:  # the client left meanwhile
            response.deliverBody(_Drop())
            return
        assert self.upstream is not None
        self.router.answered(self.upstream, self, response.headers)
        if self._judge(response) and self._may_retry():
            response.deliverBody(_Drop())
            upstream = self.upstream
            self._end_active()
            if self.body is not None:
                self.body.discard()
            assert upstream is not None
            if response.code == 404:
                self._not_found = (*self._not_found, upstream.peer or upstream.url)
            self._retry(upstream, f"HTTP {response.code} ({error_kind(response)})")
            return
        upstream = self.upstream
        if upstream.on_answer is not None:
            upstream.on_answer(response.code)
        if response.code == 404 and upstream.model is not None:
            asked = [*self._not_found, upstream.peer or upstream.url]
            note = self.router.missing(upstream.model, asked)
            if note is not None:
                self._answer_noted(response, note)
                return
        self._answer = response
        self._received = None  # answered: no other attempt will need the body
        self.response.callback(response)

    def _answer_noted(self, response: IResponse, note: str) -> None:
        """Answer the upstream's 404 for a model here, with note added to its message."""
        upstream = self.upstream
        assert upstream is not None
        types = response.headers.getRawHeaders(b"content-type", [])
        headers = [(b"content-type", value) for value in types[-1:]]
        headers.append((b"x-ollana-peer", (upstream.peer or upstream.url).encode("utf-8")))
        self._received = None
        reading = read_tail(response, self.proxy.clock, self.proxy.idle_timeout, NOTE_LIMIT)
        self._pending = reading

        def read(body: bytes | Failure) -> None:
            self._pending = None
            self.upstream_owes(False)
            self._end_active()
            if self.response.called:
                return
            if isinstance(body, Failure):
                self._give_up(body)
            else:
                self.response.callback(LocalAnswer(404, headers, with_note(body, note)))

        reading.addBoth(read)

    def _judge(self, response: IResponse) -> bool:
        """Tell the router what the answer says of its upstream; True when it is an Ollana
        server's own error that another server may not give."""
        upstream = self.upstream
        assert upstream is not None
        kind = error_kind(response)
        if kind in RETRY_ELSEWHERE:
            reason = f"HTTP {response.code} ({kind})"
            if kind == "unreachable":
                self.router.failed(upstream, reason)
            elif kind == "timeout":
                self.router.errored(upstream, reason)
            if kind == "busy" and self._may_queue_elsewhere and self._queue_at is None:
                self._queue_at = upstream  # where to queue if no server has a free slot
            return True  # "busy" is load, not failure: nothing to hold against it
        if response.code in SERVER_ERRORS:
            self.router.errored(upstream, f"HTTP {response.code}")
            return response.code == 503  # Ollama's queue is full: another may have room
        if response.code == 404 and self.candidates and upstream.model is not None:
            # Not found here, though the next candidate lists it (a stale model list).
            return self.router.lists(self.candidates[0], upstream.model)
        self.router.succeeded(upstream)
        return False

    def _may_retry(self) -> bool:
        """Whether another candidate can still be tried: the body so far is kept, and the
        client is still there. When none is left, the first server that said it would only
        queue the request gets it again, to queue it."""
        if self._received is None or self.client_gone:
            return False
        if not self.candidates and self._queue_at is not None:
            self.candidates, self._queue_at = [self._queue_at], None
        return bool(self.candidates)

    def _retry(self, upstream: Upstream, reason: str) -> None:
        self.reasons.append(f"{upstream.url}: {reason}")
        log.info("Retrying {path} elsewhere: {url}: {reason}",
                 path=log_text(self.uri), url=upstream.url, reason=reason)  # fmt: skip
        self._attempt()

    def _attempt_failed(self, failure: Failure) -> None:
        self._pending = None
        self.awaiting_head = False
        self.upstream_owes(False)
        if self.body is not None:
            self.body.discard()
        upstream = self.upstream
        self._end_active()
        if self._cancelled or self.response.called or upstream is None:
            return  # the client left: says nothing about the upstream
        reason = self._attempt_reason(failure)
        if self.timed_out:  # slow is not broken: it counts, but only ejection takes it out
            self.router.errored(upstream, reason)
        elif self.down is None:  # found down: the router knows already
            self.router.failed(upstream, reason)
        if self._may_retry():
            self._retry(upstream, reason)
            return
        self.reasons.append(f"{upstream.url}: {reason}")
        if len(self.reasons) > 1:
            failure = Failure(UpstreamsFailed("ollana: no server could answer: "
                                              + "; ".join(self.reasons)))  # fmt: skip
        self._give_up(failure)

    def _attempt_reason(self, failure: Failure) -> str:
        if self.down is not None:
            return f"found down while the request waited: {self.down}"
        if self.timed_out:
            return f"sent nothing for {self._waited:g} s"
        if failure.check(error.TimeoutError):
            return "cannot connect: timed out"
        return describe_error(failure.value)

    def upstream_down(self, reason: str) -> None:
        """The router found this attempt's upstream down: a request still waiting for its
        answer is tried elsewhere at once (nothing has reached the client), and a stream
        that stays silent for STALLED seconds from its last chunk is cut rather than left
        hanging (one that goes on is left alone)."""
        if self.awaiting_head and self._pending is not None:
            self.down = reason
            self._pending.cancel()
        elif self.relay is not None and self._idle.since is not None:
            silent_since = self._idle.since
            left = silent_since + STALLED - self.proxy.clock.seconds()
            if left <= 0:
                self._cut_if_silent(silent_since, reason)
            elif self._stall_check is None:
                self._stall_check = self.proxy.clock.callLater(
                    left, self._cut_if_silent, silent_since, reason
                )

    def _cut_if_silent(self, since: float, reason: str) -> None:
        self._stall_check = None
        if self.relay is None or self.client_gone or self._idle.since != since:
            return  # ended, or a chunk came: it is not hung
        log.warn("Upstream {url} was found down mid-response: {reason}",
                 url=self._url(), reason=reason)  # fmt: skip
        self.relay.stopProducing()
        self._abort_client()

    def _settle(self, answer: LocalAnswer) -> None:
        self._pending = None
        self._received = None
        if not self.response.called:
            self.response.callback(answer)

    def _settle_failed(self, failure: Failure) -> None:
        self._pending = None
        if not self.response.called:
            self._give_up(failure)

    def _give_up(self, reason: Failure | BaseException) -> None:
        """Fail the exchange: no more attempts, so nothing more of the body is kept."""
        self._received = None
        self.response.errback(reason)

    def _cancel(self, response: defer.Deferred[IResponse | LocalAnswer]) -> None:
        self._cancelled = True
        self.candidates = []
        if self._pending is not None:
            self._pending.cancel()

    def _end_active(self) -> None:
        active, self._active = self._active, None
        if active is not None:
            self.router.ended(active, self)

    def _upstream_headers(self) -> Headers:
        request = self.request
        headers = Headers(dict(end_to_end(request.requestHeaders)))
        client_ip = getattr(request.getClientAddress(), "host", None)
        if client_ip:
            forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
            headers.setRawHeaders(
                b"x-forwarded-for", [b", ".join([*forwarded, client_ip.encode("ascii")])]
            )
        headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
        headers.addRawHeader(b"via", VIA)
        for name, value in self.proxy.upstream_headers:
            headers.setRawHeaders(name, [value])
        headers.removeHeader(QUEUE_HEADER)  # ours to send, not an app's
        self._may_queue_elsewhere = bool(self.candidates) and self._received is not None \
            and self.router.warm(self.candidates[0])  # fmt: skip
        if self._may_queue_elsewhere:
            headers.setRawHeaders(QUEUE_HEADER, [b"elsewhere"])
        return headers

    # Called by ProxyRequest.

    def received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._received is not None:
            self._received.append(data)
            self._received_size += len(data)
        if self.scanner is not None:
            if self.scanner.feed(data):
                self._scanned(self.scanner.model)
            return  # what the scan read is what an attempt starts with
        if self._keyed is not None:
            if self._received is None or self._received_size > KEY_LIMIT:
                self._choose(self._keyed)  # too big to parse for a key: the model will do
            return
        if self._whole:
            if self._received is None or self._received_size > KEY_LIMIT:
                self._plan(None)  # too big to read whole: the router routes it as it can
            return
        if self.body is not None:
            self.body.received(data)
        if self._received is not None and self._received_size > self.router.scan_limit:
            self._received = None  # past the replay limit: no other attempt now

    def completed(self) -> None:
        self.client_complete = True
        if self.scanner is not None:
            self.scanner.end()
            self._scanned(self.scanner.model)
        elif self._keyed is not None:
            self._choose(self._keyed, self._key(self._keyed))
        elif self._whole:
            self._plan(b"".join(self._received) if self._received is not None else None)
        elif self.body is not None:
            self.body.completed()

    def respond(self) -> None:
        """Relay the upstream's answer, or an error, once render has been reached."""
        self.responding = True
        self.response.addCallbacks(self._got_response, self._failed)
        self.response.addErrback(self._bug)

    # The upstream's side.

    def _got_response(self, response: IResponse | LocalAnswer) -> None:
        if isinstance(response, LocalAnswer):
            self._answer_here(response)
            return
        if self.client_gone:
            response.deliverBody(_Drop())
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        self._answering()
        request.responseHeaders.removeHeader(b"server")  # twisted.web's own, not the upstream's
        # twisted.web.client keeps the response's Connection header to itself, so
        # custom headers that it names pass (Ollama sends none).
        for name, values in end_to_end(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if request.method == b"HEAD":  # the length of what a GET would give
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.setHeader(b"content-length", length[-1])
        elif response.length is not UNKNOWN_LENGTH and response.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", str(response.length).encode("ascii"))
        request.responseHeaders.addRawHeader(b"via", VIA)
        upstream = self.upstream
        if upstream is not None and upstream.peer:
            request.setHeader(b"x-ollana-peer", upstream.peer.encode("utf-8"))
        if upstream is not None and upstream.route:
            request.setHeader(b"x-ollana-route", upstream.route.encode("ascii"))
            self.proxy.metrics.routed(upstream.route)
        if response.code == 200 and self.uri.partition(b"?")[0] in GENERATIONS:
            self._tail = (b"", b"")  # the final chunk says how much of the prompt was cached
        for name, value in self.router.response_headers():
            request.setHeader(name, value)
        self.upstream_owes(True)
        response.deliverBody(ResponseRelay(self))

    def _answer_here(self, answer: LocalAnswer) -> None:
        if self.client_gone:
            return
        request = self.request
        request.setResponseCode(answer.code)
        self._answering()
        for name, value in answer.headers:
            request.responseHeaders.addRawHeader(name, value)
        request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
        request.write(answer.body)
        request.finish()

    def relaying(self, relay: ResponseRelay) -> None:
        self.relay = relay
        if self.client_gone:
            relay.stopProducing()
        else:
            self.request.registerProducer(relay, True)

    def chunk(self, data: bytes) -> None:
        if self._tail is not None:
            self._tail = (self._tail[-1], data)
        if not self.client_gone:
            # More chunks of one read arrive after the client paused the relay: the wait
            # that follows is the client's.
            self.upstream_owes(self.relay is None or not self.relay.paused)
            self.request.write(data)

    def upstream_ended(self, reason: Failure) -> None:
        self.upstream_owes(False)
        self._end_active()
        if self.client_gone:
            return
        self.request.unregisterProducer()
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # Failure.check is slow
            if self._tail is not None:
                self._count_prompt(b"".join(self._tail))
            self.request.finish()
        else:
            log.warn(
                "Upstream {url} broke off a response: {reason}",
                url=self._url(),
                reason=describe_error(reason.value),
            )
            self._abort_client()

    def _count_prompt(self, tail: bytes) -> None:
        """Count the prompt tokens an answer's final NDJSON line reports: those the server
        evaluated, and those its prompt cache held."""
        line = tail.rstrip().rpartition(b"\n")[2]
        try:
            final = json.loads(line)
        except ValueError:
            return
        if not isinstance(final, dict) or final.get("done") is not True:
            return
        prompt, cached = final.get("prompt_eval_count"), final.get("prompt_eval_cached_count", 0)
        if isinstance(prompt, int) and isinstance(cached, int):
            self.proxy.metrics.prompt_tokens(cached, prompt - cached)

    def _failed(self, failure: Failure) -> None:
        self.upstream_owes(False)
        self._end_active()
        if self.client_gone:
            return
        code, message, headers = self._describe(failure)
        log.warn("{code} for {method} {path}: {message}", code=code, message=message,
                 method=log_text(self.method), path=log_text(self.uri))  # fmt: skip
        request = self.request
        request.setResponseCode(code)
        self._answering()
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        for name, value in headers.items():
            request.setHeader(name, value)
        for name, value in self.router.response_headers():
            request.setHeader(name, value)
        body = error_body(message)
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def _describe(self, failure: Failure) -> tuple[int, str, dict[bytes, bytes]]:
        """The status, message and headers of an error answer of ours, the headers saying
        whose error it is (ERROR_HEADER)."""
        unreachable = {ERROR_HEADER: b"unreachable"}
        if failure.check(NoUpstream):
            retry = str(int(self.proxy.retry_after)).encode("ascii")
            return 503, str(failure.value), {b"retry-after": retry, **unreachable}
        if failure.check(BadTarget):
            return 400, str(failure.value), {ERROR_HEADER: b"refused"}
        if failure.check(Busy):
            return 503, str(failure.value), {b"retry-after": b"1", ERROR_HEADER: b"busy"}
        if failure.check(UpstreamsFailed):
            return 502, str(failure.value), unreachable
        url = self._url()
        if self.down is not None:
            return 502, f"ollana: {url} was found down: {self.down}", unreachable
        if self.timed_out:
            message = f"ollana: {url} sent nothing for {self._waited:g} s"
            return 504, message, {ERROR_HEADER: b"timeout"}
        if failure.check(error.TimeoutError):
            return 504, f"ollana: cannot connect to {url}: timed out", unreachable
        return 502, f"ollana: no answer from {url}: {describe_error(failure.value)}", unreachable

    def _bug(self, failure: Failure) -> None:
        log.failure("Error while relaying a response", failure)
        self._abort_client()

    # Ends.

    def _answering(self) -> None:
        self.first_byte = self.proxy.clock.seconds() - self.arrived

    def _count(self) -> None:
        """The request has ended, one way or another: count it and log it, once."""
        if self._counted:
            return
        self._counted = True
        request = self.request
        status = request.code if request.startedWriting else CLIENT_CLOSED
        duration = self.proxy.clock.seconds() - self.arrived
        peer = self.upstream.peer if self.upstream is not None else None
        self.proxy.metrics.ended(peer, status, self.first_byte, duration, self.bytes_in,
                                 request.sentLength)  # fmt: skip
        access(request, peer, status, duration, self.bytes_in,
               cut=None if request.finished or not request.startedWriting
               else "upstream" if self.client_gone else "client")  # fmt: skip

    def _request_done(self, ignored: None) -> None:
        self._count()
        self._stop_idle()
        self._end_active()
        if not self.responding:  # answered without us (OPTIONS *, say): drop the upstream
            self.response.addErrback(lambda _: None)
            self.response.cancel()

    def _client_left(self, failure: Failure) -> None:
        self._count()
        self.client_gone = True
        self._stop_idle()
        self.scanner = None
        self._keyed = None
        self._whole = False
        if self.body is not None:
            self.body.discard()
        if self.relay is not None:
            self.relay.stopProducing()
        elif self._answer is not None:  # answered, but not relayed yet
            self._answer.deliverBody(_Drop())
        else:
            self.response.cancel()  # stops the attempt under way, and any other
        if not self.responding:  # render never came: nobody else will look at the result
            self.response.addErrback(lambda _: None)
        self._end_active()

    def _abort_client(self) -> None:
        """End the client's connection abruptly: a truncated response must not look whole."""
        self.client_gone = True
        self._end_active()
        self.request.abort()

    def _url(self) -> str:
        return self.upstream.url if self.upstream is not None else "(no upstream)"

    # The idle timeout (ollana.idle) counts only while the upstream is the one to move
    # next; while it owes the answer itself (the request sent, no response yet), the
    # first-byte timeout counts instead, as a model may be loading.

    def upstream_owes(self, owes: bool) -> None:
        """Start the idle timeout afresh (the upstream is to move next) or stop it."""
        self._idle.owes(owes and not self.client_gone)

    def _limit(self) -> float:
        """How long the upstream may owe us what it owes now."""
        if self.awaiting_head and (self.body is None or not self.body.unfinished):
            return self.proxy.first_byte_timeout
        return self.proxy.idle_timeout

    def _stop_idle(self) -> None:
        self._idle.stop()
        check, self._stall_check = self._stall_check, None
        if check is not None and check.active():
            check.cancel()

    def _went_idle(self) -> None:
        if self.relay is not None:
            log.warn("Upstream {url} went idle mid-response", url=self._url())
            self.relay.stopProducing()
            self._abort_client()
        elif self._pending is not None:
            self.timed_out = True
            self._waited = self._limit()
            self._pending.cancel()


class _Drop(Protocol):
    """Takes a response nobody wants and drops its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@dataclass
class ProxySettings:
    """What every exchange of one listener shares."""

    agent: IAgent
    router: IRouter
    clock: IReactorTime
    idle_timeout: float = 120.0
    first_byte_timeout: float = 300.0
    retry_after: float = 5.0
    metrics: Metrics = field(default_factory=Metrics)
    gate: Gate = field(default_factory=Gate)
    upstream_headers: Sequence[tuple[bytes, bytes]] = ()  # added to every upstream request
