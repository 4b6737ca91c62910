"""Which broadcast addresses reach the local networks of this machine."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Protocol

from ollana.config import LIMITED_BROADCAST


class InterfaceAddress(Protocol):
    """One address of an interface, as psutil.net_if_addrs() lists it."""

    @property
    def family(self) -> int: ...
    @property
    def address(self) -> str: ...
    @property
    def netmask(self) -> str | None: ...
    @property
    def broadcast(self) -> str | None: ...


class InterfaceStats(Protocol):
    """An interface's state, as psutil.net_if_stats() gives it."""

    @property
    def isup(self) -> bool: ...


def broadcast_addresses(
    addresses: Mapping[str, Iterable[InterfaceAddress]], stats: Mapping[str, InterfaceStats]
) -> list[str]:
    """The directed broadcast address of every up, non-loopback IPv4 interface.

    Takes the shapes of psutil.net_if_addrs() and psutil.net_if_stats().
    """
    found: list[str] = []
    for name, entries in addresses.items():
        stat = stats.get(name)
        if stat is None or not stat.isup:
            continue
        for entry in entries:
            if entry.family != socket.AF_INET:
                continue
            address = ipaddress.IPv4Address(entry.address)
            if address.is_loopback:
                continue
            if entry.broadcast:
                broadcast = ipaddress.IPv4Address(entry.broadcast)
            elif entry.netmask:
                network = ipaddress.IPv4Network(f"{address}/{entry.netmask}", strict=False)
                broadcast = network.broadcast_address
            else:
                continue
            if broadcast != address and str(broadcast) not in found:
                found.append(str(broadcast))
    return found


def default_broadcast_addresses() -> list[str]:
    """This machine's directed broadcast addresses, or the limited broadcast if none."""
    import psutil  # here, not at the top: only discovery asks, and psutil costs 0.8 MB

    found = broadcast_addresses(psutil.net_if_addrs(), psutil.net_if_stats())
    return found or [LIMITED_BROADCAST]
