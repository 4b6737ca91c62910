"""Who may use a listener, and how much: the source allow-list, the credential between
Ollana nodes, the browser origins (client mode, as Ollama's), and the limits that keep one
client from starving the others."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.python.usage import UsageError
from twisted.web.http_headers import Headers

from ollana.auth import CREDENTIAL_HEADER, credential_ok
from ollana.limits import open_files_cap
from ollana.origins import CorsAnswer, OriginPolicy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str, option: str = "--allow") -> Network:
    """A CIDR block (an address alone means just that address)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"{option}: not an address or CIDR block: {text!r}") from None


TEREDO = ipaddress.ip_network("2001::/32")  # "private" to Python, reachable from anywhere


@functools.lru_cache(maxsize=4096)  # asked for every request: sources repeat
def local_network_address(host: str) -> bool:
    """Loopback, private (RFC 1918, unique-local, and the other private-use ranges of the
    IANA registries, 198.18.0.0/15 included), or link-local: the default allow-list."""
    address = _address(host)
    if address is None:
        return False
    if address.is_loopback:
        return True
    if address.is_unspecified or address.is_reserved:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address in TEREDO:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


@functools.lru_cache(maxsize=4096)  # asked for every request: sources repeat
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass
class Gate:
    """The rules of one listener. The defaults admit everyone: right for the client's
    loopback listener; server mode narrows them."""

    allow: Sequence[Network] | None = None  # None: local_network_address()
    open_to_all: bool = True  # False: only allowed sources (server mode)
    secret: bytes | None = None  # set: requests must carry the credential
    max_body: int | None = None  # bytes; None: no limit (model blobs are huge)
    max_connections_per_source: int | None = None
    # In all: 4096, or fewer if open files allow fewer (two per proxied request).
    max_connections: int | None = field(default_factory=open_files_cap)
    header_timeout: float = 30.0  # seconds from a request's first byte to its last header
    check_host: bool = False  # True: only Host values a local Ollama accepts (client mode)
    origins: OriginPolicy | None = None  # set: browsers are answered as Ollama would (client)

    def admits_source(self, host: str) -> bool:
        """Whether a source address may use this listener (or get discovery replies)."""
        if self.open_to_all:
            return True
        if self.allow is None:
            return local_network_address(host)
        address = _address(host)
        return address is not None and any(address in network for network in self.allow)

    def refusal(self, host: str, headers: Headers) -> tuple[int, str] | None:
        """Why a request may not pass, as (status, message), or None."""
        if not self.admits_source(host):
            return 403, f"ollana: {host} is not allowed to use this server (see --allow)"
        if self.check_host and not local_hosts(headers.getRawHeaders(b"host", [b""])):
            # A web page that rebinds its own name to 127.0.0.1 must not reach Ollama
            # through us: Ollama itself refuses such Host values on its loopback port.
            return 403, "ollana: this Host is not a local name or address"
        if self.secret is not None and not _loopback(host):
            given = headers.getRawHeaders(CREDENTIAL_HEADER, [None])[-1]
            if not credential_ok(self.secret, given):
                return 401, "ollana: this server needs Ollana's shared secret (see --secret-file)"
        return None

    def cors(self, method: bytes, headers: Headers) -> CorsAnswer | None:
        """What Ollama's origin policy says of a request from a browser (one with an
        Origin), when this listener applies it; None otherwise."""
        if self.origins is None:
            return None
        origin = headers.getRawHeaders(b"origin")
        if not origin:
            return None
        host = headers.getRawHeaders(b"host", [b""])[-1]
        return self.origins.answer(
            method.decode("ascii", "replace"), origin[-1].decode("latin-1"), host.decode("latin-1")
        )


def local_hosts(values: Sequence[bytes]) -> bool:
    """Whether a request's Host values are one local name: several are never (which
    would a browser's be?)."""
    return len(values) == 1 and local_host_header(values[0])


def local_host_header(value: bytes) -> bool:
    """Whether a Host header names this machine as local apps do: an IP address,
    localhost, a .localhost/.local/.internal name, or this machine's own name."""
    text = value.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    if not name or _address(name) is not None:  # no Host at all is no browser
        return True
    return name in ("localhost", _own_name()) or name.endswith(
        (".localhost", ".local", ".internal")
    )


@functools.cache
def _own_name() -> str:
    """This machine's name, asked once (not on every request)."""
    return socket.gethostname().lower()


def _loopback(host: str) -> bool:
    address = _address(host)
    return address is not None and address.is_loopback
