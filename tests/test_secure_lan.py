"""A server with --tls and a shared secret, and clients on loopback that find it by
(loopback) broadcast: the one with the secret pins the announced certificate and gets
through; the one without hears nothing it trusts."""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived

from ollana.tap import Options, makeService
from ollana.tls import ensure_self_signed
from tests.support.fake_ollama import FakeOllama
from tests.support.processes import eventually, free_udp_port

reactor: Any = _reactor
LOOPBACK = ["--listen", "tcp:0:interface=127.0.0.1", "--broadcast", "127.255.255.255"]


class SecureLoopbackTests(TestCase):
    timeout = 60

    def start(self, *args: str) -> Any:
        options = Options()
        intervals = ["--probe-interval", "0.5", "--health-interval", "0.5"]
        options.parseOptions(
            [*LOOPBACK, "--discovery-port", str(self.discovery_port), *intervals, *args]
        )
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def test_tls_and_secret(self) -> None:
        self.discovery_port = free_udp_port()
        fake = FakeOllama(models=["llama3.2:latest"], clock=reactor)
        ollama = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")
        self.addCleanup(ollama.stopListening)
        tls_dir = os.path.abspath(self.mktemp())
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as f:
            f.write("the LAN's shared secret\n")
        server = self.start("--mode", "server", "--tls", "--tls-dir", tls_dir,
                            "--secret-file", secret,
                            "--ollama", f"http://127.0.0.1:{ollama.getHost().port}")  # fmt: skip
        server_port = await server.getServiceNamed("http").whenListening()
        client = self.start("--mode", "client", "--secret-file", secret)
        await eventually(
            reactor, lambda: any(p.healthy and p.last_ok for p in client.pool), 15, 0.05
        )
        [peer] = client.pool
        self.assertEqual((peer.scheme, peer.port), ("https", server_port))
        self.assertEqual(peer.fingerprint, ensure_self_signed(tls_dir).fingerprint)

        port = await client.getServiceNamed("http").whenListening()
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port}/api/version", pool=pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-ollana-peer"),
                         [f"127.0.0.1:{server_port}".encode()])  # fmt: skip
        await response.content()

        # Plain HTTP to the TLS port is not answered as HTTP: no silent fallback.
        with self.assertRaises(ResponseNeverReceived):
            await treq.get(f"http://127.0.0.1:{server_port}/api/version", pool=pool)

        outsider = self.start("--mode", "client")  # no secret
        responder = server.getServiceNamed("discovery").responder
        rejected = responder.rejected
        # its probes, ignored
        await eventually(reactor, lambda: responder.rejected > rejected + 1, 15, 0.05)
        self.assertEqual(list(outsider.pool), [])
