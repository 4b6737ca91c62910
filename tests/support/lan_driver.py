"""HTTP requests to the local Ollana from inside a test namespace, reported as JSON.

tests/test_lan.py cannot reach a namespace's 127.0.0.1 from outside, so it runs this inside
with ``ip netns exec NS python -m tests.support.lan_driver COMMAND ...``:

- ``get PATH``: one GET; prints one request's outcome (status, X-Ollana-Peer, body).
- ``generate MODEL``: one POST /api/generate with ``"stream": false``; prints the same.
- ``until MODEL PEER --within S``: generate until PEER answers (or S seconds pass); prints
  the last outcome with ``tries`` and ``matched``.
- ``load MODEL``: ``--held`` requests whose bodies stop right after the model, then
  ``--streams`` streaming generates, all at once; then one more stream every ``--every``
  seconds. Once the first streams all stream, prints
  ``streaming {"streams": {PEER: N}, "first": PEER}``: the streams under way on each server,
  and the server of the first stream (where the held ones went too). On a line ``killed``
  from standard input it sends the rest of the held bodies and starts ``--after`` more
  streams, and when every request has ended prints
  ``report {"killed_at": SECONDS, "outcomes": [OUTCOME, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from io import BytesIO
from typing import Any

from twisted.internet import defer, stdio, task
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

OLLANA = "http://127.0.0.1:11434"
PROMPT_WORDS = 20


@dataclass
class Outcome:
    """What became of one request."""

    n: int = 0
    phase: str = ""
    started: float = 0.0  # seconds since the driver started
    answered: float | None = None  # when the headers arrived
    ended: float | None = None  # when it succeeded or failed
    headers: bool = False  # the response's status line and headers arrived
    status: int | None = None
    peer: str | None = None
    ok: bool = False  # a 200 whose body arrived whole
    lines: int = 0  # NDJSON lines received
    error: str | None = None
    body: Any = None


class _Collect(Protocol):
    """Gathers a response body, counting its lines as they come."""

    def __init__(self, outcome: Outcome, on_line: Callable[[], None]) -> None:
        self.outcome = outcome
        self.on_line = on_line
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.outcome.lines = self.data.count(b"\n")
        self.on_line()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class Driver:
    """Sends requests to the local Ollana, each on a connection of its own."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.began = reactor.seconds()

    def now(self) -> float:
        """Seconds since the driver started, to the millisecond."""
        return round(self.reactor.seconds() - self.began, 3)

    async def request(
        self,
        outcome: Outcome,
        method: bytes,
        path: str,
        producer: IBodyProducer | None = None,
        on_line: Callable[[], None] = lambda: None,
    ) -> Outcome:
        """Send one request and fill in its outcome; never raises."""
        headers = Headers({b"content-type": [b"application/json"]})
        try:
            response = await self.agent.request(method, (OLLANA + path).encode(), headers,
                                                producer)  # fmt: skip
            outcome.headers = True
            outcome.answered = self.now()
            outcome.status = response.code
            peer = response.headers.getRawHeaders(b"x-ollana-peer")
            outcome.peer = peer[0].decode() if peer else None
            collect = _Collect(outcome, on_line)
            response.deliverBody(collect)
            data = await collect.done
        except Exception as e:
            outcome.error = _describe(e)
            return outcome
        finally:
            outcome.ended = self.now()
        try:
            outcome.body = json.loads(data)
        except ValueError:
            text = data.decode("utf-8", "replace")
            outcome.body = [json.loads(line) for line in text.splitlines() if line.strip()]
        outcome.ok = outcome.status == 200 and _complete(outcome.body)
        return outcome

    def generate(
        self,
        model: str,
        stream: bool,
        outcome: Outcome,
        on_line: Callable[[], None] = lambda: None,
        hold: defer.Deferred[None] | None = None,
    ) -> defer.Deferred[Outcome]:
        """POST /api/generate; with hold, the body stops after the model until hold fires."""
        head = json.dumps({"model": model, "stream": stream})[:-1].encode()
        prompt = " ".join(f"w{i}" for i in range(PROMPT_WORDS))
        body = head + b', "prompt": ' + json.dumps(prompt).encode() + b"}"
        if hold is None:
            producer: IBodyProducer = FileBodyProducer(BytesIO(body))
        else:
            producer = HeldBody(body, len(head), hold)
        coro = self.request(outcome, b"POST", "/api/generate", producer, on_line)
        return defer.Deferred.fromCoroutine(coro)


@implementer(IBodyProducer)
class HeldBody:
    """A body whose first bytes go at once and the rest once ``hold`` fires."""

    def __init__(self, body: bytes, first: int, hold: defer.Deferred[None]) -> None:
        self.body = body
        self.first = first
        self.hold = hold
        self.length = len(body)
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body[: self.first])
        done: defer.Deferred[None] = defer.Deferred()

        def rest(_: object) -> None:
            if not self.stopped:
                consumer.write(self.body[self.first :])
                done.callback(None)

        self.hold.addCallback(rest)
        return done

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def _complete(body: Any) -> bool:
    """Whether a generate answer (one object, or NDJSON lines) is whole."""
    if isinstance(body, list):
        return len(body) == PROMPT_WORDS + 1 and body[-1].get("done") is True
    return isinstance(body, dict) and (body.get("done") is not False)


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return f"{type(e).__name__}: " + "; ".join(_describe(r.value) for r in reasons)
    return f"{type(e).__name__}: {e}".splitlines()[0]


class Load:
    """Streams started at once and then steadily, with a phase switched from stdin."""

    def __init__(self, driver: Driver, args: argparse.Namespace) -> None:
        self.driver = driver
        self.args = args
        self.outcomes: list[Outcome] = []
        self.running: list[defer.Deferred[Outcome]] = []
        self.phase = "before"
        self.after_left = args.after
        self.first_done = False
        self.killed_at: float | None = None
        self.hold: defer.Deferred[None] = defer.Deferred()
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = driver.reactor

    def start_one(self, held: bool = False) -> None:
        phase = "held" if held else self.phase
        outcome = Outcome(n=len(self.outcomes), phase=phase, started=self.driver.now())
        self.outcomes.append(outcome)
        hold = self.hold if held else None
        running = self.driver.generate(self.args.model, True, outcome, self.check, hold)
        self.running.append(running)

    def check(self) -> None:
        """Once the first streams have all sent a line (or ended), say how many streams each
        server carries, and which one the first stream went to (the held requests too)."""
        first = self.outcomes[self.args.held : self.args.held + self.args.streams]
        if self.first_done or not all(o.lines or o.error for o in first):
            return
        self.first_done = True
        streams: dict[str, int] = {}
        for o in self.outcomes:
            if o.peer and o.lines and o.ended is None:
                streams[o.peer] = streams.get(o.peer, 0) + 1
        print("streaming " + json.dumps({"streams": streams, "first": first[0].peer}), flush=True)

    def tick(self) -> None:
        if self.phase == "after":
            if self.after_left == 0:
                self.loop.stop()
                return
            self.after_left -= 1
        if len(self.outcomes) >= self.args.most:
            self.loop.stop()
            return
        self.start_one()

    def killed(self) -> None:
        self.phase = "after"
        self.killed_at = self.driver.now()
        self.hold.callback(None)

    async def run(self) -> list[Outcome]:
        for _ in range(self.args.held):
            self.start_one(held=True)
        for _ in range(self.args.streams):
            self.start_one()
        await self.loop.start(self.args.every, now=False)
        await defer.DeferredList(self.running)
        return self.outcomes


class Commands(LineReceiver):
    """Reads the test's commands (one: ``killed``) from standard input."""

    delimiter = b"\n"

    def __init__(self, load: Load) -> None:
        self.load = load

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"killed":
            self.load.killed()


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("get").add_argument("path")
    commands.add_parser("generate").add_argument("model")
    until = commands.add_parser("until")
    until.add_argument("model")
    until.add_argument("peer")
    until.add_argument("--within", type=float, default=15)
    load = commands.add_parser("load")
    load.add_argument("model")
    load.add_argument("--streams", type=int, default=40)
    load.add_argument("--every", type=float, default=0.02)
    load.add_argument("--after", type=int, default=30)
    load.add_argument("--held", type=int, default=5, help="requests held until killed")
    load.add_argument("--most", type=int, default=400, help="never more requests than this")
    args = parser.parse_args(argv)
    driver = Driver(reactor)
    if args.command == "get":
        outcome = await driver.request(Outcome(), b"GET", args.path)
        print(json.dumps(asdict(outcome)))
    elif args.command == "generate":
        outcome = await driver.generate(args.model, False, Outcome())
        print(json.dumps(asdict(outcome)))
    elif args.command == "until":
        deadline = reactor.seconds() + args.within
        tries = 0
        while True:
            tries += 1
            last = await driver.generate(args.model, False, Outcome(n=tries))
            matched = last.ok and last.peer == args.peer
            if matched or reactor.seconds() >= deadline:
                break
            await task.deferLater(reactor, 0.1)
        print(json.dumps({**asdict(last), "tries": tries, "matched": matched}))
    else:
        running = Load(driver, args)
        stdio.StandardIO(Commands(running), reactor=reactor)
        outcomes = [asdict(o) | {"body": None} for o in await running.run()]
        report = {"killed_at": running.killed_at, "outcomes": outcomes}
        print("report " + json.dumps(report), flush=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
