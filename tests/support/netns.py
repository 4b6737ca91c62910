"""A small LAN of network namespaces for multi-host tests (Linux, root, iproute2).

``Lan(name)`` builds a switch namespace holding a bridge and, for each
``lan.add_host()``, a host namespace wired to it by a veth pair with an address in
198.18.0.0/24 (a range reserved for benchmarks, routed nowhere). ``lan.remove()``
deletes every namespace, and with it every interface; call it even when a test fails.
Nothing here touches the host's own interfaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "198.18.0"
REQUIRE_ENV = "OLLANA_REQUIRE_NETNS"


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's ip command"
    probe = f"ollana-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


@dataclass
class Host:
    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class Lan:
    def __init__(self, name: str) -> None:
        self.prefix = f"{name}{os.getpid() % 100000}"
        self.switch = self.prefix + "sw"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._add_namespace(self.switch)
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.remove()  # nobody else can: the caller never gets this Lan
            raise

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)

    def add_host(self) -> Host:
        index = len(self.hosts) + 2
        host = Host(f"{self.prefix}h{index}", f"{SUBNET}.{index}")
        self._add_namespace(host.namespace)
        port = f"p{index}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", host.namespace)  # fmt: skip
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "brd", "+", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def remove(self) -> None:
        """Delete every namespace of this LAN (their interfaces go with them)."""
        for namespace in reversed(self._namespaces):
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._namespaces = []
