"""Browsers and the client's listener (tests.support.memnet): Ollama's origin policy applied there,
preflights answered there as Ollama answers them, the servers' own CORS headers replaced;
a server's listener passes everything through to its Ollama."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from ollana.origins import OriginPolicy
from ollana.simulator import FakeOllama
from ollana.site import ProxySite
from tests.support.memnet import Reply, TwoServersCase

APP = "http://localhost:3000"
EVIL = "https://evil.example"
PREFLIGHT = {
    b"origin": APP.encode(),
    b"access-control-request-method": b"POST",
    b"access-control-request-headers": b"content-type",
}


def cors_view(reply: Reply) -> tuple[int | None, list[tuple[bytes, Sequence[bytes]]], bytes]:
    """Status, headers (but Date, which is the clock's) and body, to compare answers."""
    headers = sorted(
        (name.lower(), values)
        for name, values in reply.headers.getAllRawHeaders()
        if name.lower() != b"date"
    )
    return reply.status, headers, reply.body


class ClientListenerTests(TwoServersCase):
    a_models = ["alpha:latest"]
    b_models = ["beta:latest"]

    def ollama(
        self, method: bytes, path: str, headers: dict[bytes, bytes], body: Any = None
    ) -> Reply:
        """The same request, straight to A's (simulated) Ollama."""
        return self.call(method, path, body, headers, url=self.a.ollama_url)

    def asked_of_ollamas(self, method: str) -> list[tuple[str, str]]:
        return [r for s in (self.a, self.b) for r in s.fake.requests if r[0] == method]

    def test_a_preflight_gets_ollama_s_answer(self) -> None:
        here = self.call(b"OPTIONS", "/api/chat", headers=PREFLIGHT)
        self.assertEqual(self.asked_of_ollamas("OPTIONS"), [], "answered by the client")
        ollama = self.ollama(b"OPTIONS", "/api/chat", PREFLIGHT)
        self.assertEqual(here.status, 204)
        self.assertEqual(cors_view(here), cors_view(ollama))
        self.assertEqual(here.header(b"access-control-allow-origin"), APP)
        self.assertEqual(here.headers.getRawHeaders(b"vary"),
                         [b"Origin", b"Access-Control-Request-Method",
                          b"Access-Control-Request-Headers"])  # fmt: skip

    def test_an_origin_ollama_refuses_gets_403(self) -> None:
        for method, body in ((b"OPTIONS", None), (b"POST", {"model": "alpha", "prompt": "x"}),
                             (b"GET", None)):  # fmt: skip
            headers = {**PREFLIGHT, b"origin": EVIL.encode()}
            here = self.call(method, "/api/generate", body, headers)
            self.assertEqual((here.status, here.body), (403, b""), method)
            self.assertEqual(cors_view(here), cors_view(self.ollama(method, "/api/generate",
                                                                    headers, body)))  # fmt: skip
        self.assertEqual([r for r in self.a.fake.requests if r[1] == "/api/generate"],
                         [("OPTIONS", "/api/generate"), ("POST", "/api/generate"),
                          ("GET", "/api/generate")], "only those sent straight to it")  # fmt: skip
        self.assertEqual([r for r in self.b.fake.requests if r[1] == "/api/generate"], [])

    def test_answers_to_an_allowed_origin_carry_ollama_s_headers(self) -> None:
        headers = {b"origin": APP.encode()}
        for method, path, body in ((b"GET", "/api/tags", None),  # merged here
                                   (b"POST", "/api/generate", {"model": "alpha", "prompt": "hi"}),
                                   (b"POST", "/api/show", {"model": "nope"})):  # fmt: skip
            here = self.call(method, path, body, headers)
            ollama = self.ollama(method, path, headers, body)
            self.assertEqual(here.status, ollama.status, path)
            for name in (b"vary", b"access-control-allow-origin"):
                self.assertEqual(here.headers.getRawHeaders(name),
                                 ollama.headers.getRawHeaders(name), (path, name))  # fmt: skip
            self.assertEqual(here.header(b"access-control-allow-origin"), APP)

    def test_ollama_origins_is_the_client_s(self) -> None:
        """An origin the client allows is served, though the servers' Ollamas would refuse
        it: the client judges browsers, and the Origin goes no further."""
        site: ProxySite = self.network.listeners[(self.client.host, 11434)]  # type: ignore[assignment]
        site.proxy.gate.origins = OriginPolicy.from_env({"OLLAMA_ORIGINS": "https://*.example"})
        headers = {b"origin": EVIL.encode()}
        here = self.call(b"POST", "/api/generate", {"model": "beta", "prompt": "hi"}, headers)
        self.assertEqual((here.status, here.header(b"access-control-allow-origin")), (200, EVIL))
        self.assertEqual(self.ollama(b"GET", "/api/tags", headers).status, 403)
        fake = self.b.fake
        [sent] = [h for r, h in zip(fake.requests, fake.headers, strict=True)
                  if r == ("POST", "/api/generate")]  # fmt: skip
        self.assertFalse(sent.hasHeader(b"origin"))
        refused = self.call(b"GET", "/api/tags", headers={b"origin": b"https://evil.other"})
        self.assertEqual(refused.status, 403)

    def test_a_server_s_own_cors_headers_are_replaced(self) -> None:
        self.network.listeners[(self.b.host, 11434)] = Site(LooseOllama(self.b.fake),
                                                             reactor=self.network)  # fmt: skip
        here = self.call(b"POST", "/api/show", {"model": "beta"}, {b"origin": APP.encode()})
        self.assertEqual(here.status, 200)
        self.assertEqual(here.headers.getRawHeaders(b"access-control-allow-origin"), [APP.encode()])
        self.assertFalse(here.headers.hasHeader(b"access-control-allow-credentials"))
        self.assertEqual(here.headers.getRawHeaders(b"vary"), [b"Origin"])
        plain = self.call(b"POST", "/api/show", {"model": "beta"})
        self.assertEqual(plain.header(b"access-control-allow-origin"), "*", "not ours to judge")

    def test_requests_not_from_a_browser_pass(self) -> None:
        plain = self.call(b"OPTIONS", "/api/chat")
        self.assertEqual(plain.status, 204)
        self.assertEqual(len(self.asked_of_ollamas("OPTIONS")), 1, "not a preflight: relayed")
        same = self.call(b"GET", "/api/version", headers={b"origin": b"http://127.0.0.21:11434"})
        self.assertEqual((same.status, same.header(b"access-control-allow-origin")), (200, None))

    def test_a_server_s_listener_passes_everything_through(self) -> None:
        for origin in (APP, EVIL):
            headers = {**PREFLIGHT, b"origin": origin.encode()}
            through = self.call(b"OPTIONS", "/api/chat", headers=headers, url=self.a.url)
            ollama = self.ollama(b"OPTIONS", "/api/chat", headers)
            self.assertEqual(through.status, ollama.status, origin)
            self.assertEqual(through.header(b"access-control-allow-origin"),
                             ollama.header(b"access-control-allow-origin"))  # fmt: skip
        self.assertEqual(len(self.asked_of_ollamas("OPTIONS")), 4)


class LooseOllama(Resource):
    """An Ollama that allows every origin, credentials too, whatever it is asked."""

    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self.fake = fake.resource()

    def render(self, request: Any) -> Any:
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"access-control-allow-credentials", b"true")
        return self.fake.getChildWithDefault(b"", request).render(request)
