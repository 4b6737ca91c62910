"""Ollama's browser policy, pure: which origins it allows and what it answers to CORS.

Ollama allows a fixed list of origins plus ``OLLAMA_ORIGINS`` and answers through
gin-contrib/cors, configured with wildcards and browser-extension schemes on. This module
says the same things without I/O, so that a listener standing in for Ollama (the client's
local listener, ``ollana.simulator``) answers a browser exactly as Ollama would::

    policy = OriginPolicy.from_env(os.environ)
    answer = policy.answer("OPTIONS", origin="http://localhost:3000", host="127.0.0.1:11434")
    answer.status   # 204: answered here; 403: refused; None: serve the request
    answer.headers  # to add to the response, in order (``Vary`` may repeat)

The rules, as Ollama 0.12 (gin-contrib/cors 1.7) applies them:

- No ``Origin``, or an ``Origin`` that is ``http://`` or ``https://`` plus the request's
  ``Host``: not a CORS request; served as is, with no CORS header.
- An origin allowed exactly (entries compared trimmed and lowercased, the origin as
  sent) or by a wildcard entry (one ``*``: ``*suffix``, ``prefix*`` or ``prefix*suffix``,
  compared as sent, case-sensitive). An entry ``*`` alone allows every origin.
- A refused origin gets 403 with an empty body, whatever the method.
- ``OPTIONS`` from an allowed origin is a preflight, answered 204 without looking at the
  requested method or headers: ``Access-Control-Allow-Methods``, ``-Allow-Headers``,
  ``-Max-Age`` (12 h) and ``Vary`` (three lines), then ``-Allow-Origin``.
- Any other method from an allowed origin is served, with ``Vary: Origin`` and
  ``Access-Control-Allow-Origin: <origin>`` added (``*`` when every origin is allowed).

``OLLAMA_ORIGINS`` is read as Ollama reads it: quotes and spaces trimmed from the whole
value, then split on commas with no trimming of each entry. An entry Ollama would refuse to
start with (no ``*`` and no http, https or browser-extension scheme, an empty entry from a
stray comma, two ``*``) raises ``ValueError`` here.

``host_allowed`` is Ollama's other guard: when it listens on a loopback address it serves
only requests whose ``Host`` is a loopback, private or unspecified IP, ``localhost``, the
machine's own name, or a name ending ``.localhost``, ``.local`` or ``.internal`` (Ollama
also lets through the machine's own addresses, which a pure function cannot know).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        origin
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for origin in (f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
ALLOW_HEADERS = ",".join(
    [
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "Openai-Beta",  # gin-contrib/cors writes each name in Go's canonical case
        *(
            "X-Stainless-" + part
            for part in (
                "Arch",
                "Async",
                "Custom-Poll-Interval",
                "Helper-Method",
                "Lang",
                "Os",
                "Package-Version",
                "Poll-Helper",
                "Retry-Count",
                "Runtime",
                "Runtime-Version",
                "Timeout",
            )
        ),  # fmt: skip
    ]
)
MAX_AGE = "43200"

_SCHEMES = (
    "http://",
    "https://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_PRIVATE = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]


@dataclass(frozen=True)
class CorsAnswer:
    """What to do with a request: answer it here (``status``) or serve it, adding ``headers``."""

    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


NOT_CORS = CorsAnswer()
REFUSED = CorsAnswer(status=403)


def origins_from_env(env: Mapping[str, str]) -> list[str]:
    """Ollama's allowed origins: ``OLLAMA_ORIGINS``'s entries first, then the defaults."""
    value = env.get("OLLAMA_ORIGINS", "").strip("\"' ")
    extra = value.split(",") if value else []
    return [*extra, *DEFAULT_ORIGINS]


class OriginPolicy:
    """Ollama's origin policy for a list of allowed origins (the defaults if none given)."""

    def __init__(self, origins: Sequence[str] = DEFAULT_ORIGINS) -> None:
        for origin in origins:
            if origin.count("*") > 1:
                raise ValueError(f"bad origin {origin!r}: only one * is allowed")
            if "*" not in origin and not origin.startswith(_SCHEMES):
                raise ValueError(
                    f"bad origin {origin!r}: origins must contain '*' or start with "
                    + ", ".join(_SCHEMES)
                )
        self.origins = tuple(origins)
        self.allow_all = "*" in self.origins
        self._exact = frozenset(o.strip().lower() for o in self.origins)
        self._wildcards = [_wildcard(o) for o in self.origins if "*" in o]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OriginPolicy:
        """The policy an Ollama started with this environment applies."""
        return cls(origins_from_env(env))

    def allows(self, origin: str) -> bool:
        """Whether a browser page from this origin may use the API."""
        if self.allow_all or origin in self._exact:
            return True
        for prefix, suffix in self._wildcards:
            if prefix == "*" and origin.endswith(suffix):
                return True
            if suffix == "*" and origin.startswith(prefix):
                return True
            if origin.startswith(prefix) and origin.endswith(suffix):
                return True
        return False

    def answer(self, method: str, origin: str | None, host: str | None) -> CorsAnswer:
        """What Ollama does with a request carrying this ``Origin`` and ``Host``."""
        if not origin or origin in (f"http://{host}", f"https://{host}"):
            return NOT_CORS
        if not self.allows(origin):
            return REFUSED
        allow_origin = [("Access-Control-Allow-Origin", "*" if self.allow_all else origin)]
        vary = [] if self.allow_all else [("Vary", "Origin")]
        if method != "OPTIONS":
            return CorsAnswer(None, (*vary, *allow_origin))
        if vary:
            vary += [("Vary", "Access-Control-Request-Method"),
                     ("Vary", "Access-Control-Request-Headers")]  # fmt: skip
        preflight = [
            ("Access-Control-Allow-Methods", ALLOW_METHODS),
            ("Access-Control-Allow-Headers", ALLOW_HEADERS),
            ("Access-Control-Max-Age", MAX_AGE),
        ]
        return CorsAnswer(204, (*preflight, *vary, *allow_origin))


def allowed(origin: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether Ollama, started with this environment, allows this origin."""
    return OriginPolicy.from_env(env or {}).allows(origin)


def host_allowed(host: str, hostname: str = "") -> bool:
    """Whether Ollama listening on loopback serves a request with this ``Host`` header."""
    name = host
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return ip.is_loopback or ip.is_unspecified or any(ip in net for net in _PRIVATE)
    name = name.lower()
    if name in ("", "localhost") or (hostname and name == hostname.lower()):
        return True
    return name.endswith(_LOCAL_SUFFIXES)


def _wildcard(origin: str) -> tuple[str, str]:
    star = origin.index("*")
    if star == 0:
        return "*", origin[1:]
    if star == len(origin) - 1:
        return origin[:star], "*"
    return origin[:star], origin[star + 1 :]


__all__ = [
    "ALLOW_HEADERS",
    "ALLOW_METHODS",
    "DEFAULT_ORIGINS",
    "MAX_AGE",
    "NOT_CORS",
    "REFUSED",
    "CorsAnswer",
    "OriginPolicy",
    "allowed",
    "host_allowed",
    "origins_from_env",
]
