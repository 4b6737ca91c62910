"""ollana models (ollana list) and ollana ps: which models are where, as ollama list and
ollama ps show them, from a client-mode Ollana's merged listings."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollana.cli import CommandOptions
from ollana.cli.listing import (
    LISTING_URL,
    ModelsOptions,
    PsOptions,
    format_models,
    format_ps,
    human_bytes,
    human_time,
    listing,
    parse_time,
)

reactor: Any = _reactor
NOW = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
A, B = "198.18.0.2:11435", "198.18.0.3:11435"
TAGS = {
    "models": [
        {"name": "llama3.2:latest", "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d8",
         "size": 2019393189, "modified_at": "2026-11-10T08:00:00.123456789+01:00",
         "ollana_servers": [A, B]},
        {"name": "qwen3:8b", "digest": "500a1f067a9f", "size": 5225388164,
         "modified_at": "2026-11-30T23:58:00Z", "ollana_servers": [B]},
    ]
}  # fmt: skip
PS = {
    "models": [
        {"name": "llama3.2:latest", "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d8",
         "size": 3100000000, "size_vram": 3100000000, "context_length": 4096,
         "expires_at": "2026-12-01T00:04:00Z", "ollana_servers": [A]},
        {"name": "qwen3:8b", "digest": "500a1f067a9f", "size": 6000000000,
         "size_vram": 1500000000, "expires_at": "2318-01-01T00:00:00Z",
         "ollana_servers": [A, B]},
    ]
}  # fmt: skip


class FormatTests(SynchronousTestCase):
    def test_models_as_ollama_list_with_the_servers(self) -> None:
        self.assertEqual(
            format_models(TAGS["models"], NOW).splitlines(),
            [
                "NAME             ID            SIZE    MODIFIED       SERVERS",
                f"llama3.2:latest  a80c4f17acd5  2.0 GB  2 weeks ago    {A}, {B}",
                f"qwen3:8b         500a1f067a9f  5.2 GB  2 minutes ago  {B}",
            ],
        )

    def test_models_of_a_plain_ollama(self) -> None:
        table = format_models([{"name": "x"}], NOW).splitlines()
        self.assertEqual(table[1].split(), ["x", "-", "-", "-", "-"])

    def test_ps_as_ollama_ps_with_the_servers(self) -> None:
        self.assertEqual(
            format_ps(PS["models"], NOW).splitlines(),
            [
                "NAME             ID            SIZE    PROCESSOR        CONTEXT  UNTIL"
                "               SERVERS",
                "llama3.2:latest  a80c4f17acd5  3.1 GB  100% GPU         4096     4 minutes "
                f"from now  {A}",
                "qwen3:8b         500a1f067a9f  6 GB    75%/25% CPU/GPU  -        Forever"
                f"             {A}, {B}",
            ],
        )
        stopping = format_ps([{**PS["models"][0], "expires_at": "2026-11-30T23:59:00Z"}], NOW)
        self.assertIn(" Stopping... ", stopping)

    def test_sizes(self) -> None:
        for value, text in ((0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"),
                            (27400000, "27 MB"), (2.0e9, "2 GB"), (4.7e9, "4.7 GB"),
                            (1.2e12, "1.2 TB"), (None, "-"), (-1, "-")):  # fmt: skip
            self.assertEqual(human_bytes(value), text, value)

    def test_times(self) -> None:
        self.assertEqual(parse_time("2026-12-01T00:00:00Z"), NOW)
        self.assertEqual(parse_time("2026-12-01T01:00:00.5+01:00"), NOW + 0.5)
        self.assertEqual(parse_time("2026-12-01T00:00:00.123456789Z"), NOW + 0.123456789)
        for bad in ("yesterday", "", None, 12, "2026-13-01T00:00:00Z"):
            self.assertIsNone(parse_time(bad), bad)
        self.assertEqual(human_time(NOW - 0.5, NOW), "Less than a second ago")
        self.assertEqual(human_time(NOW - 1, NOW), "1 second ago")
        self.assertEqual(human_time(NOW - 7200, NOW), "2 hours ago")
        self.assertEqual(human_time(NOW + 86400, NOW), "1 day from now")
        self.assertEqual(human_time(None, NOW), "-")


class OptionsTests(SynchronousTestCase):
    def test_where_it_asks(self) -> None:
        cases: list[tuple[list[str], dict[str, str], str]] = [
            ([], {}, LISTING_URL),
            ([], {"OLLAMA_HOST": ":11437"}, "http://127.0.0.1:11437"),
            (["--url", "box.lan"], {"OLLAMA_HOST": ":1"}, "http://box.lan:11434"),
        ]
        for argv, env, base in cases:
            options = ModelsOptions(env)
            options.parseOptions(argv)
            self.assertEqual(options["base"], base, (argv, env))
        self.assertRaises(usage.UsageError, ModelsOptions({}).parseOptions, ["--url", "ftp://x"])

    def test_commands(self) -> None:
        for command, kind in (
            ("models", ModelsOptions),
            ("list", ModelsOptions),
            ("ps", PsOptions),
        ):
            options = CommandOptions()
            options.parseOptions([command, "--json"])
            self.assertEqual(options.subCommand, command)
            self.assertIsInstance(options.subOptions, kind)


class Listings(Resource):
    isLeaf = True

    def __init__(self, answers: dict[bytes, tuple[int, bytes]]) -> None:
        super().__init__()
        self.answers = answers

    def render_GET(self, request: Any) -> bytes:
        code, body = self.answers.get(request.path, (404, b"404 page not found"))
        request.setResponseCode(code)
        return body


class ListingTests(TestCase):
    def setUp(self) -> None:
        self.answers: dict[bytes, tuple[int, bytes]] = {}
        port = reactor.listenTCP(0, Site(Listings(self.answers)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"127.0.0.1:{port.getHost().port}"

    async def run_listing(
        self, kind: type[ModelsOptions | PsOptions], *argv: str
    ) -> tuple[int, str, str]:
        options = kind({})
        options.parseOptions(["--url", self.url, *argv])
        out, err = io.StringIO(), io.StringIO()
        code = await listing(reactor, options, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_models_and_ps(self) -> None:
        self.answers[b"/api/tags"] = (200, json.dumps(TAGS).encode())
        self.answers[b"/api/ps"] = (200, json.dumps(PS).encode())
        code, out, err = await self.run_listing(ModelsOptions)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0].split(), ["NAME", "ID", "SIZE", "MODIFIED", "SERVERS"])
        self.assertTrue(out.splitlines()[1].endswith(f"{A}, {B}"))
        code, out, _ = await self.run_listing(PsOptions)
        self.assertEqual((code, out.splitlines()[0].split()[3]), (0, "PROCESSOR"))
        code, out, _ = await self.run_listing(PsOptions, "--json")
        self.assertEqual((code, json.loads(out)), (0, PS))

    async def test_failures(self) -> None:
        self.answers[b"/api/tags"] = (503, b'{"error": "ollana: no Ollama server found yet"}')
        code, out, err = await self.run_listing(ModelsOptions)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"ollana: no listing from http://{self.url}/api/tags: HTTP 503: "
                              "ollana: no Ollama server found yet\n")  # fmt: skip
        code, _, err = await self.run_listing(PsOptions)
        self.assertEqual(code, 1)
        self.assertIn("HTTP 404, and the answer is not JSON", err)
        self.answers[b"/api/tags"] = (200, b'{"version": "0.12.0"}')
        code, _, err = await self.run_listing(ModelsOptions)
        self.assertIn("the answer is not a listing of models", err)

    async def test_nothing_listening(self) -> None:
        options = ModelsOptions({})
        options.parseOptions(["--url", "127.0.0.1:9"])
        err = io.StringIO()
        self.assertEqual(await listing(reactor, options, io.StringIO(), err), 1)
        refused = "ollana: no listing from http://127.0.0.1:9/api/tags: connection refused\n"
        self.assertEqual(err.getvalue(), refused)
