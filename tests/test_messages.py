"""The proxy's message policy on its own: headers passed on, request-targets, error answers."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Response
from twisted.web.http_headers import Headers

from ollana.messages import (
    VIA,
    BadTarget,
    end_to_end,
    error_body,
    error_kind,
    error_response,
    origin_form,
)
from ollana.upstream import ERROR_HEADER
from tests.support.http import head, header_values


class EndToEndTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_headers_stay(self) -> None:
        headers = Headers(
            {
                b"Connection": [b"keep-alive, X-Secret"],
                b"X-Secret": [b"hop"],
                b"Keep-Alive": [b"5"],
                b"Transfer-Encoding": [b"chunked"],
                b"Content-Length": [b"5"],
                b"Host": [b"x"],
                b"Expect": [b"100-continue"],
                b"Proxy-Authorization": [b"Basic eA=="],
                b"X-Custom": [b"one", b"two"],
                b"Content-Type": [b"application/json"],
            }
        )
        passed = {name.lower(): list(values) for name, values in end_to_end(headers)}
        self.assertEqual(
            passed, {b"x-custom": [b"one", b"two"], b"content-type": [b"application/json"]}
        )

    def test_without_connection_only_the_fixed_set_stays(self) -> None:
        headers = Headers({b"TE": [b"trailers"], b"Upgrade": [b"h2c"], b"X-A": [b"1"]})
        self.assertEqual([name.lower() for name, _ in end_to_end(headers)], [b"x-a"])
        self.assertEqual(VIA, b"1.1 ollana")


class OriginFormTests(SynchronousTestCase):
    def test_origin_form_is_kept(self) -> None:
        self.assertEqual(origin_form(b"/api/tags?a=b"), b"/api/tags?a=b")

    def test_absolute_form_becomes_a_path(self) -> None:
        for target, path in [
            (b"http://localhost:11434/api/tags?a=b", b"/api/tags?a=b"),
            (b"HTTPS://example.com/x", b"/x"),
            (b"http://localhost:11434?a=b", b"/?a=b"),
            (b"http://localhost:11434", b"/"),
        ]:
            self.assertEqual(origin_form(target), path, target)

    def test_other_forms_are_refused(self) -> None:
        for target in (b"example.com:443", b"*", b"ftp://example.com/x"):
            e = self.assertRaises(BadTarget, origin_form, target)
            self.assertIn("cannot proxy the request-target", str(e))


class ErrorAnswerTests(SynchronousTestCase):
    def test_error_body_is_ollamas_shape(self) -> None:
        self.assertEqual(json.loads(error_body("ollana: no")), {"error": "ollana: no"})
        self.assertTrue(error_body("x").endswith(b"\n"))

    def test_error_response_is_whole_and_closes(self) -> None:
        response = error_response(503, "ollana: busy", [(b"Retry-After", b"1")])
        line, _ = head(response)
        self.assertEqual(line, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(header_values(response, b"retry-after"), [b"1"])
        self.assertEqual(header_values(response, b"connection"), [b"close"])
        body = response.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(header_values(response, b"content-length"), [b"%d" % len(body)])
        self.assertEqual(json.loads(body), {"error": "ollana: busy"})

    def test_phrases_twisted_lacks(self) -> None:
        self.assertEqual(
            head(error_response(431, "x"))[0], b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        self.assertEqual(head(error_response(599, "x"))[0], b"HTTP/1.1 599 Error")

    def test_error_kind_is_the_last_header_value(self) -> None:
        def answer(*kinds: bytes) -> Response:
            headers = Headers({ERROR_HEADER: list(kinds)} if kinds else {})
            return Response((b"HTTP", 1, 1), 503, b"Service Unavailable", headers, None)

        self.assertIsNone(error_kind(answer()))
        self.assertEqual(error_kind(answer(b"refused", b" Busy ")), "busy")
