"""What Ollana's listener (ollana.site) relies on in twisted.web, checked on the installed
Twisted: the order in which the public hooks of ``HTTPChannel``, ``Request`` and ``Site``
are called, and what each is given. Ollana uses no private twisted.web name; these hooks'
order is not promised either, so a release that changes one fails here, by its name.

The channel and request here are twisted.web's own, recording their calls; nothing of
Ollana's takes part, so that a failure points at Twisted and not at our code.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from tests.support.http import CLIENT, Silent


class RecordingRequest(Request):
    """A twisted.web request that notes the hooks called on it, in the channel's log."""

    def __init__(self, channel: RecordingChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.events = channel.events

    def log(self, *event: Any) -> None:
        self.events.append(event)

    def gotLength(self, length: int | None) -> None:
        self.log("gotLength", self.method, self.requestHeaders.getRawHeaders(b"host"))
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.log("handleContentChunk", data)
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.log("requestReceived", command, path, version)
        super().requestReceived(command, path, version)

    def process(self) -> None:
        self.log("process", self.method, self.path)
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        self.log("Request.connectionLost", reason.type)
        super().connectionLost(reason)


class RecordingChannel(HTTPChannel):
    """A twisted.web channel that notes the hooks called on it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []

    def lineReceived(self, line: bytes) -> None:
        queued = len(self.requests)
        super().lineReceived(line)
        self.events.append(("lineReceived", line, queued, len(self.requests)))

    def allHeadersReceived(self) -> None:
        self.events.append(("allHeadersReceived",))
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self.events.append(("allContentReceived",))
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self.events.append(("requestDone", self.persistent))
        super().requestDone(request)
        self.events.append(("requestDone ended",))

    def loseConnection(self) -> None:
        self.events.append(("loseConnection",))
        super().loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.events.append(("lineLengthExceeded", len(line)))
        super().lineLengthExceeded(line)

    def timeoutConnection(self) -> None:
        self.events.append(("timeoutConnection",))
        super().timeoutConnection()


class RecordingSite(Site):
    protocol = RecordingChannel  # type: ignore[assignment]


class ContractCase(SynchronousTestCase):
    """A recording site on a Clock, and a connection to it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Silent()
        self.site = RecordingSite(self.resource, requestFactory=RecordingRequest,
                                  reactor=self.clock)  # fmt: skip
        self.connect()

    def connect(self) -> None:
        """A new connection to the site: self.channel, on self.transport."""
        self.channel: Any = self.site.buildProtocol(CLIENT)
        self.transport = StringTransport(peerAddress=CLIENT)
        self.channel.makeConnection(self.transport)

    def names(self) -> list[str]:
        return [event[0] for event in self.channel.events]

    def lines(self) -> list[tuple[Any, ...]]:
        return [event[1:] for event in self.channel.events if event[0] == "lineReceived"]

    def answer(self, request: Request) -> None:
        request.setHeader(b"content-length", b"0")
        request.finish()


class RequestLineTests(ContractCase):
    """ProxyChannel.lineReceived reads the request line where twisted.web hands it over,
    and knows it for one by the request twisted.web makes for it."""

    def test_lineReceived_gets_each_line_and_a_request_is_made_for_the_first(self) -> None:
        self.channel.dataReceived(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n")
        self.assertEqual(
            self.lines(),
            [
                (b"GET /api/tags HTTP/1.1", 0, 1),
                (b"Host: x", 1, 1),
                (b"X-A: 1", 1, 1),
                (b"", 1, 1),
            ],
            "HTTPChannel.lineReceived: each line of a request head, the request made "
            "(appended to HTTPChannel.requests) while its request line is handled",
        )

    def test_a_blank_line_before_a_request_line_makes_no_request(self) -> None:
        self.channel.dataReceived(b"\r\nGET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.lines()[:2], [(b"", 0, 0), (b"GET /api/tags HTTP/1.1", 0, 1)],
                         "HTTPChannel.lineReceived: one blank line before a request line is "
                         "skipped without a request")  # fmt: skip

    def test_the_split_request_line_is_what_requestReceived_gets(self) -> None:
        for line in (b"GET /api/tags?x=1&y=%2F HTTP/1.1", b"POST http://h:1/api/chat HTTP/1.1",
                     b"OPTIONS * HTTP/1.0", b"DELETE /api/delete HTTP/1.1"):  # fmt: skip
            self.connect()
            self.channel.dataReceived(line + b"\r\nHost: x\r\n\r\n")
            [received] = [e[1:] for e in self.channel.events if e[0] == "requestReceived"]
            self.assertEqual(received, tuple(line.split()),
                             "Request.requestReceived(command, path, version): the request "
                             "line's three parts")  # fmt: skip

    def test_a_malformed_request_line_is_answered_400_and_closed_by_loseConnection(self) -> None:
        self.channel.dataReceived(b"GET  /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n",
                         "HTTPChannel's own answer to a malformed request line")  # fmt: skip
        self.assertIn(
            "loseConnection",
            self.names(),
            "HTTPChannel.loseConnection: how twisted.web closes after its 400",
        )
        self.assertNotIn("gotLength", self.names(), "Request.gotLength: not for a 400")
        self.assertTrue(self.transport.disconnecting)


class HookOrderTests(ContractCase):
    """ProxyRequest starts its exchange in gotLength, before twisted.web gives the request
    its method; ProxyChannel stops the head's timer in allHeadersReceived, marks the body
    whole in allContentReceived and goes back to timing heads in requestDone."""

    def test_gotLength_comes_after_the_headers_and_before_requestReceived(self) -> None:
        self.channel.dataReceived(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
        )
        self.channel.dataReceived(b"{}")
        self.assertEqual(
            [e for e in self.channel.events if e[0] not in ("lineReceived", "process")],
            [
                ("allHeadersReceived",),
                ("gotLength", Request.method, [b"x"]),
                ("handleContentChunk", b"{}"),
                ("allContentReceived",),
                ("requestReceived", b"POST", b"/api/chat", b"HTTP/1.1"),
            ],
            "HTTPChannel.allHeadersReceived, then Request.gotLength with the headers but not "
            "yet Request.method, the body, HTTPChannel.allContentReceived and only then "
            "Request.requestReceived",
        )

    def test_requestReceived_hands_the_request_to_process(self) -> None:
        """ProxyRequest.process starts a relayed answer; everything before it is set."""
        self.channel.dataReceived(b"GET /api/tags?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(
            [e for e in self.channel.events if e[0] in ("requestReceived", "process")],
            [
                ("requestReceived", b"GET", b"/api/tags?x=1", b"HTTP/1.1"),
                ("process", b"GET", b"/api/tags"),
            ],
            "Request.requestReceived sets method and path, then calls Request.process",
        )
        self.assertEqual(len(self.resource.pending), 1, "Request.process renders")

    def test_a_request_kept_meanwhile_is_read_in_requestDone(self) -> None:
        self.channel.dataReceived(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n"
        )
        read = [line for line, _, _ in self.lines()]
        self.assertEqual(
            read,
            [b"GET /a HTTP/1.1", b"Host: x", b""],
            "HTTPChannel keeps the next request's bytes while one is answered",
        )
        del self.channel.events[:]
        self.answer(self.resource.pending[0])
        self.assertEqual(
            self.names(),
            ["requestDone", "lineReceived", "lineReceived", "requestDone ended"],
            "HTTPChannel.requestDone: reads the kept bytes of the next request",
        )
        self.assertEqual(self.channel.events[0], ("requestDone", True))

    def test_requestDone_closes_a_connection_that_is_not_persistent(self) -> None:
        self.channel.dataReceived(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n")
        del self.channel.events[:]
        self.answer(self.resource.pending[0])
        self.assertEqual(self.names(), ["requestDone", "loseConnection", "requestDone ended"],
                         "HTTPChannel.requestDone: closes when HTTPChannel.persistent is "
                         "false, reading no more")  # fmt: skip
        self.assertEqual(self.channel.events[0], ("requestDone", False))


class ConnectionTests(ContractCase):
    def test_Site_buildProtocol_gives_the_channel_its_site_and_reactor(self) -> None:
        self.assertIs(self.channel.site, self.site, "HTTPChannel.site, set by Site.buildProtocol")
        self.assertEqual(self.channel.callLater, self.clock.callLater,
                         "HTTPChannel.callLater: the site's reactor's, for timers")  # fmt: skip
        self.assertEqual(self.channel.timeOut, self.site.timeOut, "HTTPChannel.timeOut")

    def test_timeoutConnection_after_timeOut_seconds_of_silence(self) -> None:
        self.channel.dataReceived(b"GET /a HTTP/1.1\r\n")
        self.clock.advance(self.channel.timeOut - 1)
        self.assertNotIn("timeoutConnection", self.names())
        self.clock.advance(1)
        self.assertIn(
            "timeoutConnection",
            self.names(),
            "HTTPChannel.timeoutConnection (TimeoutMixin), on the site's reactor",
        )

    def test_lineLengthExceeded_for_a_line_too_long(self) -> None:
        self.channel.dataReceived(b"GET /" + b"a" * self.channel.MAX_LENGTH + b" HTTP/1.1\r\n")
        self.assertEqual(
            self.names(),
            ["lineLengthExceeded"],
            "HTTPChannel.lineLengthExceeded (LineReceiver.MAX_LENGTH)",
        )

    def test_connectionLost_reaches_each_request_and_takes_its_channel(self) -> None:
        self.channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nab")
        [request] = self.channel.requests
        finished = request.notifyFinish()
        self.channel.connectionLost(Failure(error.ConnectionLost()))
        self.assertIn(("Request.connectionLost", error.ConnectionLost), self.channel.events,
                      "HTTPChannel.connectionLost calls Request.connectionLost")  # fmt: skip
        self.assertIsNone(request.channel, "Request.channel: None once the connection is lost")
        self.failureResultOf(finished, error.ConnectionLost)
