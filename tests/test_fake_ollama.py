"""The fake Ollama's own promises: pacing on its clock, gating, digests."""

from __future__ import annotations

import hashlib
import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_ollama import FakeOllama


def request(fake: FakeOllama, data: bytes) -> StringTransport:
    channel = fake.site().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport


def post(path: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


class FakeOllamaTests(SynchronousTestCase):
    def test_paced_stream(self) -> None:
        clock = Clock()
        fake = FakeOllama(clock=clock)
        fake.pace = 2.0
        transport = request(fake, post(b"/api/generate", b'{"model": "m", "prompt": "a b"}'))
        self.assertEqual((fake.emitted, transport.value()), (0, b""))
        clock.advance(2)
        self.assertEqual(fake.emitted, 1)
        self.assertIn(b'"response": "a "', transport.value())
        clock.advance(2)
        clock.advance(2)
        self.assertEqual(fake.emitted, 3)
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))

    def test_gated_stream(self) -> None:
        fake = FakeOllama(clock=Clock())
        fake.gated = True
        transport = request(fake, post(b"/api/chat", b'{"messages": [{"content": "x y"}]}'))
        self.assertEqual(fake.emitted, 0)
        fake.release(2)
        self.assertEqual(fake.emitted, 2)
        self.assertNotIn(b'"done": true', transport.value())
        fake.release()
        self.assertIn(b'"done": true', transport.value())

    def test_blob_digest_is_checked(self) -> None:
        fake = FakeOllama(clock=Clock())
        good = hashlib.sha256(b"blob").hexdigest().encode()
        self.assertIn(b" 201 ", request(fake, post(b"/api/blobs/sha256:" + good, b"blob")).value())
        self.assertIn(b" 400 ", request(fake, post(b"/api/blobs/sha256:" + good, b"blub")).value())
        head = request(fake, b"HEAD /api/blobs/sha256:" + good + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 200 ", head.value())

    def test_non_streaming_chat(self) -> None:
        fake = FakeOllama(clock=Clock())
        transport = request(
            fake, post(b"/api/chat", b'{"stream": false, "messages": [{"content": "hi you"}]}')
        )
        body = json.loads(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["message"], {"role": "assistant", "content": "hi you "})
        self.assertTrue(body["done"])
