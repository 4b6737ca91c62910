"""Ollama's origin policy: which browser origins it allows and what it answers them."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ollana.origins import (
    ALLOW_HEADERS,
    DEFAULT_ORIGINS,
    NOT_CORS,
    REFUSED,
    OriginPolicy,
    allowed,
    host_allowed,
    origins_from_env,
)


class AllowedTests(SynchronousTestCase):
    def test_the_defaults(self) -> None:
        self.assertEqual(len(DEFAULT_ORIGINS), 17)
        for origin in (
            "http://localhost",
            "https://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://0.0.0.0:8080",
            "app://obsidian.md",
            "file://",
            "tauri://localhost",
            "vscode-webview://1f2e3d",
            "vscode-file://vscode-app",
        ):
            self.assertTrue(allowed(origin), origin)

    def test_refused_by_default(self) -> None:
        for origin in (
            "https://example.com",
            "http://localhost.evil.com",  # neither http://localhost nor http://localhost:*
            "http://127.0.0.1.nip.io",
            "http://LOCALHOST:3000",  # the origin is compared as sent
            "http://192.168.1.10:3000",
            "chrome-extension://abcdefghijklmnop",
            "null",
        ):
            self.assertFalse(allowed(origin), origin)

    def test_ollama_origins_adds_to_the_defaults(self) -> None:
        env = {"OLLAMA_ORIGINS": "https://*.example.com,chrome-extension://abc,http://Chat.lan"}
        entries = ["https://*.example.com", "chrome-extension://abc", "http://Chat.lan"]
        self.assertEqual(origins_from_env(env), [*entries, *DEFAULT_ORIGINS])
        self.assertTrue(allowed("https://chat.example.com", env))
        self.assertTrue(allowed("https://.example.com", env))  # gin-contrib/cors's prefix*suffix
        self.assertFalse(allowed("http://chat.example.com", env))
        self.assertTrue(allowed("chrome-extension://abc", env))
        self.assertFalse(allowed("chrome-extension://abd", env))
        self.assertTrue(allowed("http://chat.lan", env))  # exact entries are lowercased
        self.assertFalse(allowed("http://Chat.lan", env))
        self.assertTrue(allowed("http://localhost:3000", env))

    def test_wildcard_forms(self) -> None:
        policy = OriginPolicy(["*.trusted.lan", "http://dev-*", "https://*:8443"])
        self.assertTrue(policy.allows("http://a.trusted.lan"))
        self.assertTrue(policy.allows("http://dev-box:3000"))
        self.assertTrue(policy.allows("https://anything:8443"))
        self.assertFalse(policy.allows("https://anything:8444"))

    def test_quotes_and_spaces_around_the_whole_value(self) -> None:
        self.assertTrue(allowed("https://a.example", {"OLLAMA_ORIGINS": "'https://a.example' "}))

    def test_a_star_allows_everything(self) -> None:
        policy = OriginPolicy.from_env({"OLLAMA_ORIGINS": "*"})
        self.assertTrue(policy.allows("https://anything.example"))
        self.assertEqual(policy.answer("GET", "https://a.example", "h").headers,
                         (("Access-Control-Allow-Origin", "*"),))  # fmt: skip

    def test_values_ollama_refuses_to_start_with(self) -> None:
        for value in (
            "https://a.example, https://b.example",  # the space is part of the second entry
            "https://a.example,",  # an empty entry
            "example.com",  # no scheme
            "http://*.example.*",  # two stars
        ):
            self.assertRaises(ValueError, OriginPolicy.from_env, {"OLLAMA_ORIGINS": value})


class AnswerTests(SynchronousTestCase):
    policy = OriginPolicy()

    def test_preflight(self) -> None:
        answer = self.policy.answer("OPTIONS", "http://localhost:5173", "127.0.0.1:11434")
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer.headers, (
            ("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
            ("Access-Control-Allow-Headers", ALLOW_HEADERS),
            ("Access-Control-Max-Age", "43200"),
            ("Vary", "Origin"),
            ("Vary", "Access-Control-Request-Method"),
            ("Vary", "Access-Control-Request-Headers"),
            ("Access-Control-Allow-Origin", "http://localhost:5173"),
        ))  # fmt: skip
        self.assertTrue(ALLOW_HEADERS.startswith("Authorization,Content-Type,User-Agent,Accept,"))
        self.assertIn(",Openai-Beta,X-Stainless-Arch,", ALLOW_HEADERS)
        self.assertTrue(ALLOW_HEADERS.endswith(",X-Stainless-Timeout"))

    def test_normal_request(self) -> None:
        answer = self.policy.answer("POST", "app://x", "127.0.0.1:11434")
        self.assertEqual(answer.status, None)
        expected = (("Vary", "Origin"), ("Access-Control-Allow-Origin", "app://x"))
        self.assertEqual(answer.headers, expected)

    def test_refused(self) -> None:
        for method in ("OPTIONS", "GET", "POST"):
            self.assertEqual(self.policy.answer(method, "https://evil.example", "h"), REFUSED)
        self.assertEqual(REFUSED.status, 403)

    def test_not_cors(self) -> None:
        self.assertEqual(self.policy.answer("OPTIONS", None, "127.0.0.1:11434"), NOT_CORS)
        self.assertEqual(self.policy.answer("GET", "", "127.0.0.1:11434"), NOT_CORS)
        same = self.policy.answer("POST", "http://box.lan:11434", "box.lan:11434")
        self.assertEqual(same, NOT_CORS)  # refused otherwise: box.lan is not allowed
        self.assertEqual(self.policy.answer("POST", "http://box.lan:11434", "other:1"), REFUSED)


class HostTests(SynchronousTestCase):
    def test_allowed_hosts(self) -> None:
        for host in ("127.0.0.1:11434", "localhost:11434", "localhost", "[::1]:11434", "::1",
                     "0.0.0.0:11434", "192.168.1.5:11434", "10.0.0.2", "ollama.localhost",
                     "box.local:11434", "svc.internal", "", "LOCALHOST:11434"):  # fmt: skip
            self.assertTrue(host_allowed(host), host)

    def test_refused_hosts(self) -> None:
        for host in ("example.com", "evil.com:11434", "8.8.8.8:11434", "localhost.evil.com"):
            self.assertFalse(host_allowed(host), host)

    def test_the_machine_s_own_name(self) -> None:
        self.assertTrue(host_allowed("Workstation:11434", hostname="workstation"))
        self.assertFalse(host_allowed("workstation:11434"))
