"""Settings and the parsers that turn command-line text into them.

Every parser raises twisted.python.usage.UsageError with a one-line reason that
names the option, so a bad value never ends in a traceback. Listening endpoint
descriptions are read here too (parse_endpoint, without making the endpoint).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from twisted.python.usage import UsageError

MODES = ("auto", "server", "client")
DISCOVERY_PORT = 11436
SERVER_PORT = 11435
OLLAMA_PORT = 11434
DEFAULT_OLLAMA = f"http://127.0.0.1:{OLLAMA_PORT}"
CLIENT_LISTEN = f"tcp:{OLLAMA_PORT}:interface=127.0.0.1"
SERVER_LISTEN = f"tcp:{SERVER_PORT}"
LIMITED_BROADCAST = "255.255.255.255"


class ServerTLS(Protocol):
    """What a server needs of its certificate (an ollana.tls.ServerCertificate)."""

    @property
    def cert_path(self) -> str: ...

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the certificate, as announcements carry it."""

    @property
    def fingerprint_hex(self) -> str: ...

    def listen_description(self, listen: str) -> str:
        """The ssl: description serving it where the tcp: description listen says."""


@dataclass(frozen=True)
class Settings:
    """Everything a running Ollana needs to know, already validated."""

    mode: str = "auto"
    ollama_url: str = DEFAULT_OLLAMA
    listen: str | None = None
    discovery: bool = True
    discovery_port: int = DISCOVERY_PORT
    discovery_interface: str = ""
    broadcast: tuple[str, ...] | None = None  # None: this machine's, looked up at each send
    probe_interval: float = 5.0
    health_interval: float = 5.0
    peers: tuple[tuple[str, int, str], ...] = ()  # host, port, scheme
    connect_timeout: float = 5.0
    idle_timeout: float = 120.0
    first_byte_timeout: float = 300.0
    strategy: str = "ttft"
    ollama_limits: tuple[int, int, int] = (1, 512, 3)  # slots, queue, loaded models
    unhealthy_after: int = 2
    models_interval: float = 30.0
    scan_limit: int = 8 << 20
    attempts: int = 3
    drain_timeout: float = 30.0
    secret: bytes | None = field(default=None, repr=False)  # never in logs or reprs
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None  # None: local
    max_body: int | None = None
    max_connections: int = 256  # per source, server mode
    header_timeout: float = 30.0
    tls: ServerTLS | None = None  # the server's certificate, with --tls
    tls_ca: str | None = None  # clients check servers against this CA
    node_id: bytes = field(default_factory=lambda: os.urandom(16))

    def listen_for(self, mode: str) -> str:
        """The endpoint description to listen on in this mode."""
        if self.listen is not None:
            return self.listen
        return CLIENT_LISTEN if mode == "client" else SERVER_LISTEN


def parse_port(text: str, option: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"{option}: not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{option}: port must be 1-65535, not {port}")
    return port


def parse_seconds(text: str, option: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"{option}: not a number of seconds: {text!r}") from None
    if not (math.isfinite(seconds) and 0.1 <= seconds <= 86400):
        raise UsageError(f"{option}: must be between 0.1 and 86400 seconds, not {text}")
    return seconds


def parse_count(text: str, option: str, most: int = 100) -> int:
    try:
        count = int(text)
    except ValueError:
        raise UsageError(f"{option}: not a whole number: {text!r}") from None
    if not 1 <= count <= most:
        raise UsageError(f"{option}: must be between 1 and {most}, not {count}")
    return count


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size_text(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def parse_size(text: str, option: str, most: int = 1 << 30) -> int:
    """A number of bytes, with an optional K, M or G (binary) suffix: 8M, 512K, 1048576."""
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (clean[:-1], clean[-1]) if clean[-1:] in _UNITS else (clean, "")
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise UsageError(f"{option}: not a size in bytes (like 8M or 512K): {text!r}") from None
    if not 0 <= size <= most:
        raise UsageError(f"{option}: must be between 0 and {_size_text(most)}, not {text}")
    return size


def parse_ipv4(text: str, option: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise UsageError(f"{option}: not an IPv4 address: {text!r}") from None


def parse_peer(text: str, option: str = "--peer") -> tuple[str, int, str]:
    """HOST:PORT, [IPv6]:PORT or a bare HOST (port 11435), after an optional http:// or
    https:// (a server with --tls); as (host, port, scheme)."""
    text = text.strip()
    scheme = "http"
    for prefix in ("http://", "https://"):
        if text.lower().startswith(prefix):
            scheme, text = prefix[:-3], text[len(prefix) :].removesuffix("/")
    if "/" in text:
        raise UsageError(f"{option}: expected HOST:PORT, not {text!r}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"{option}: expected [IPV6]:PORT, not {text!r}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{option}: not an IPv6 address: {host!r}") from None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise UsageError(f"{option}: write an IPv6 peer as [ADDRESS]:PORT, not {text!r}")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise UsageError(f"{option}: expected HOST:PORT, not {text!r}")
    port = parse_port(port_text, option) if port_text else SERVER_PORT
    return host, port, scheme


def parse_ollama_url(text: str, option: str = "--ollama") -> str:
    """An Ollama address as Ollama's own OLLAMA_HOST accepts it, as a base URL.

    Accepts ``http(s)://host:port``, ``host:port``, ``host``, ``:port``; a wildcard bind
    address (0.0.0.0, ::) means this machine.
    """
    text = text.strip()
    if not text:
        raise UsageError(f"{option}: empty address")
    with_scheme = text if "://" in text else "http://" + text
    try:
        parts = urlsplit(with_scheme)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"{option}: not an Ollama address: {text!r} ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{option}: scheme must be http or https, not {parts.scheme!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise UsageError(f"{option}: give only scheme, host and port, not {text!r}")
    host = parts.hostname or "127.0.0.1"
    if not _is_host(host):
        raise UsageError(f"{option}: not an http(s) URL or HOST:PORT: {text!r}")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if port is None:  # as Ollama does: its own port unless a scheme was written
        port = OLLAMA_PORT if "://" not in text else {"http": 80, "https": 443}[parts.scheme]
    if port == 0:
        raise UsageError(f"{option}: port must be 1-65535, not 0")
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}:{port}"


def _is_host(host: str) -> bool:
    """Whether host is an IP address or a DNS name (letters, digits, -, _ and dots)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return all(label.strip("-") == label and label.replace("-", "").replace("_", "").isalnum()
                   and label.isascii() for label in labels)  # fmt: skip
    return True


# The endpoint kinds Ollana listens on, with their arguments in positional order (as
# twisted.internet.endpoints.serverFromString reads them).
ENDPOINT_ARGUMENTS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog",
            "extraCertChain", "dhParameters"),
    "unix": ("address", "mode", "backlog", "lockfile"),
}  # fmt: skip


@dataclass(frozen=True)
class ListenEndpoint:
    """A listening endpoint description, read: its kind and its arguments by name."""

    kind: str
    arguments: Mapping[str, str]

    @property
    def port(self) -> int | None:
        """The TCP port (0: any free one); None for a unix: endpoint."""
        return int(self.arguments["port"]) if "port" in self.arguments else None


def parse_endpoint(text: str) -> ListenEndpoint:
    """Read a Twisted server endpoint description of a kind Ollana listens on (tcp:, tcp6:,
    ssl:, unix:), as serverFromString would, without making the endpoint. Raises ValueError
    with a one-line reason."""
    positional, named = description_arguments(text)
    kind = positional.pop(0) if positional else ""
    names = ENDPOINT_ARGUMENTS.get(kind)
    if names is None:
        raise ValueError(f"Unknown endpoint type: '{kind.lower()}'")
    if len(positional) > len(names):
        raise ValueError(f"{kind} takes at most {len(names)} arguments ({', '.join(names)})")
    arguments = dict(zip(names, positional, strict=False))
    for name, value in named.items():
        if name not in names:
            raise ValueError(f"{kind} has no argument {name!r}")
        if name in arguments:
            raise ValueError(f"{name} given twice")
        arguments[name] = value
    if names[0] not in arguments:
        raise ValueError(f"no {names[0]}")
    for name in ("port", "backlog", "lockfile"):
        if name in arguments:
            int(arguments[name])  # its ValueError says which text is not a number
    if "mode" in arguments:
        int(arguments["mode"], 8)
    return ListenEndpoint(kind, arguments)


def description_arguments(text: str) -> tuple[list[str], dict[str, str]]:
    """An endpoint description's positional and keyword arguments, unescaped, as Twisted
    reads them: colons separate them, the first = in one names it, a backslash escapes."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in split_description(text):
        pieces = [""]
        escaped = False
        for char in part:
            if escaped:
                pieces[-1] += char
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == "=" and len(pieces) == 1:
                pieces.append("")
            else:
                pieces[-1] += char
        if escaped:
            raise ValueError("it ends in a backslash")
        if len(pieces) == 1:
            positional.append(pieces[0])
        else:
            named[pieces[0]] = pieces[1]
    return positional, named


def check_endpoint(text: str, option: str = "--listen") -> str:
    """A listening endpoint description of a kind Ollana listens on (see parse_endpoint),
    checked without touching the network; the files an ssl: one names must be readable."""
    try:
        endpoint = parse_endpoint(text)
    except ValueError as e:
        raise UsageError(f"{option}: not a valid endpoint description: {text!r} ({e})") from None
    if endpoint.port is not None and not 0 <= endpoint.port <= 65535:
        raise UsageError(f"{option}: port must be 0-65535, not {endpoint.port}")
    for path in ssl_files(endpoint):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise UsageError(
                f"{option}: not a valid endpoint description: {text!r} ({e})"
            ) from None
    return text


def ssl_files(endpoint: ListenEndpoint) -> list[str]:
    """The files an ssl: endpoint reads when it is made (none for other kinds)."""
    if endpoint.kind != "ssl":
        return []
    key = endpoint.arguments.get("privateKey", "server.pem")  # Twisted's default
    files = [key, endpoint.arguments.get("certKey", key)]
    return files + [endpoint.arguments[n] for n in ("extraCertChain",) if n in endpoint.arguments]


def split_description(text: str) -> list[str]:
    """An endpoint description's colon-separated parts, backslash escapes kept as written."""
    parts = [""]
    escaped = False
    for char in text:
        if escaped or char != ":":
            parts[-1] += char
            escaped = not escaped and char == "\\"
        else:
            parts.append("")
    return parts


# Connections the kernel may hold for us before we accept them. Twisted's default (50)
# drops the SYNs of a burst, such as many apps starting streams at once; they come back
# seconds later (SYN retries). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def with_backlog(text: str) -> str:
    """A TCP or TLS listening description with our backlog, unless it names one (or has
    more than its port positionally, where a backlog might hide)."""
    if endpoint_type(text) not in ("tcp", "tcp6", "ssl"):
        return text
    if text.split(":", 1)[0].isdigit():  # "11435": the port alone, tcp implied
        text = "tcp:" + text
    options = split_description(text)[1:]
    if len([part for part in options if "=" not in part]) > 1:
        return text
    if any(part.split("=", 1)[0] == "backlog" for part in options):
        return text
    return f"{text}:backlog={LISTEN_BACKLOG}"


def endpoint_type(text: str) -> str:
    """The kind of a server endpoint description: tcp, ssl, unix, ..."""
    kind = text.split(":", 1)[0].lower()
    return "tcp" if kind.isdigit() else kind


def endpoint_scheme(text: str) -> str:
    """The URL scheme clients use for this listening endpoint."""
    return "https" if endpoint_type(text) == "ssl" else "http"
