"""Who may use a listener, and how much: the source allow-list, the credential between
Ollana nodes, and the limits that keep one client from starving the others."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.python.usage import UsageError
from twisted.web.http_headers import Headers

from ollana.auth import CREDENTIAL_HEADER, credential_ok

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str, option: str = "--allow") -> Network:
    """A CIDR block (an address alone means just that address)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"{option}: not an address or CIDR block: {text!r}") from None


def local_network_address(host: str) -> bool:
    """Loopback, private (RFC 1918, unique-local, and the other private-use ranges of the
    IANA registries), or link-local: the default allow-list."""
    address = _address(host)
    if address is None:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


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
    header_timeout: float = 30.0  # seconds from a request's first byte to its last header

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
        if self.secret is not None and not _loopback(host):
            given = headers.getRawHeaders(CREDENTIAL_HEADER, [None])[-1]
            if not credential_ok(self.secret, given):
                return 401, "ollana: this server needs Ollana's shared secret (see --secret-file)"
        return None


def _loopback(host: str) -> bool:
    address = _address(host)
    return address is not None and address.is_loopback
