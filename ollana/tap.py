"""twistd ollana: command-line options and the service maker.

This is the only module that touches the global reactor and the machine's interfaces.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import Any

from twisted.python import usage

from ollana import config
from ollana.auth import load_secret
from ollana.config import Settings
from ollana.gate import parse_network
from ollana.load import environment_limits
from ollana.strategy import DEFAULT as DEFAULT_STRATEGY
from ollana.strategy import STRATEGIES


class DiscoveryOptions(usage.Options):
    """The discovery options that both twistd ollana and ollana discover take."""

    optParameters = [
        ["discovery-port", None, str(config.DISCOVERY_PORT), "UDP port of LANA discovery."],
        [
            "secret-file",
            None,
            None,
            "File holding the LAN's shared secret [default: $OLLANA_SECRET, else none]: "
            "discovery is authenticated and servers admit only nodes that know it.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["broadcast"] = []

    def opt_broadcast(self, address: str) -> None:
        """IPv4 address to send discovery broadcasts to (repeatable) [default: the broadcast address of every up, non-loopback interface]."""  # noqa: E501 (usage help)
        self["broadcast"].append(config.parse_ipv4(address, "--broadcast"))

    def postOptions(self) -> None:
        self["discovery-port"] = config.parse_port(str(self["discovery-port"]), "--discovery-port")
        self["secret"] = load_secret(self["secret-file"], os.environ)

    def broadcast_addresses(self) -> tuple[str, ...] | None:
        """The addresses given, or None for this machine's own."""
        return tuple(self["broadcast"]) or None


class Options(DiscoveryOptions):
    synopsis = "[options]"
    longdesc = (
        "Ollana makes the Ollama servers of a LAN usable from every device. On a machine "
        "with Ollama it serves the LAN (server mode); elsewhere it finds those servers and "
        "serves 127.0.0.1:11434 for local apps (client mode)."
    )
    optFlags = [
        ["no-discovery", None, "Neither send nor answer LANA discovery datagrams."],
        [
            "tls",
            None,
            "Serve the LAN over HTTPS (server mode), with a self-signed certificate "
            "made on first run unless --tls-cert is given; clients pin it.",
        ],
    ]
    optParameters = [
        [
            "mode",
            None,
            "auto",
            "auto, server or client; auto picks server when a local Ollama answers.",
        ],
        [
            "ollama",
            None,
            None,
            "Local Ollama URL [default: $OLLAMA_HOST or http://127.0.0.1:11434].",
        ],
        [
            "listen",
            None,
            None,
            "Endpoint for the HTTP proxy [default: tcp:11434:interface=127.0.0.1 in client mode, "
            "tcp:11435 in server mode].",
        ],
        [
            "discovery-interface",
            None,
            None,
            "IPv4 address to bind the discovery socket to [default: all].",
        ],
        ["probe-interval", None, "5", "Seconds between discovery probes (client mode)."],
        ["health-interval", None, "5", "Seconds between health checks."],
        ["connect-timeout", None, "5", "Seconds to wait for a connection to an upstream."],
        [
            "first-byte-timeout",
            None,
            "300",
            "Seconds an upstream may take to start answering a request it has read (a model "
            "may be loading) before it is given up, or tried elsewhere.",
        ],
        [
            "idle-timeout",
            None,
            "120",
            "Seconds an upstream may keep a request waiting otherwise (not reading its body, "
            "silent within the response) before the request is given up.",
        ],
        [
            "strategy",
            None,
            DEFAULT_STRATEGY,
            "How client mode picks a server: ttft (by the servers' reported load, loaded "
            "models and the conversation's prompt cache), fastest, least-connections or "
            "round-robin.",
        ],
        [
            "ollama-parallel",
            None,
            None,
            "Server mode: slots per loaded model of the local Ollama, as reported to clients "
            "[default: $OLLAMA_NUM_PARALLEL, else 1].",
        ],
        [
            "ollama-max-queue",
            None,
            None,
            "Server mode: requests the local Ollama queues [default: $OLLAMA_MAX_QUEUE, else 512].",
        ],
        [
            "ollama-max-loaded",
            None,
            None,
            "Server mode: models the local Ollama keeps loaded "
            "[default: $OLLAMA_MAX_LOADED_MODELS, else 3].",
        ],
        [
            "unhealthy-after",
            None,
            "2",
            "Failed health checks in a row after which a server is no longer used.",
        ],
        ["models-interval", None, "30", "Seconds between refreshes of each server's models."],
        [
            "scan-limit",
            None,
            "8M",
            "How much of a request body is read for its model (and kept to retry elsewhere).",
        ],
        ["attempts", None, "3", "Servers tried for one request before giving up (client mode)."],
        [
            "drain-timeout",
            None,
            "30",
            "Seconds to let requests under way finish when stopping, before closing them.",
        ],
        ["max-body", None, "off", "Largest request body accepted (like 10G), or off."],
        ["max-connections", None, "256", "Connections one source may hold open (server mode)."],
        ["header-timeout", None, "30", "Seconds a client may take to send request headers."],
        [
            "tls-dir",
            None,
            None,
            "Where the self-signed certificate is kept "
            "[default: $XDG_DATA_HOME/ollana or ~/.local/share/ollana].",
        ],
        ["tls-cert", None, None, "A CA-issued certificate (PEM, chain after it) to serve."],
        ["tls-key", None, None, "The private key (PEM) of --tls-cert."],
        [
            "tls-ca",
            None,
            None,
            "CA certificate(s) (PEM) that servers' certificates must "
            "chain to (client mode); else announced fingerprints are pinned.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []
        self["allow"] = []

    def opt_allow(self, network: str) -> None:
        """Source address or CIDR block the server admits (repeatable) [default: loopback, private, link-local and unique-local ranges]."""  # noqa: E501 (usage help)
        self["allow"].append(parse_network(network))

    def opt_peer(self, peer: str) -> None:
        """A server to use besides discovered ones, as HOST:PORT (repeatable)."""
        self["peer"].append(config.parse_peer(peer))

    def postOptions(self) -> None:
        super().postOptions()
        if self["mode"] not in config.MODES:
            raise usage.UsageError(f"--mode: must be auto, server or client, not {self['mode']!r}")
        ollama = self["ollama"]
        option = "--ollama"
        if ollama is None:
            ollama = os.environ.get("OLLAMA_HOST") or config.DEFAULT_OLLAMA
            option = "OLLAMA_HOST"
        self["ollama"] = config.parse_ollama_url(ollama, option)
        if self["listen"] is not None:
            config.check_endpoint(self["listen"])
            announced = self["mode"] != "client" and not self["no-discovery"]
            if announced and config.endpoint_type(self["listen"]) not in ("tcp", "tcp6", "ssl"):
                raise usage.UsageError(
                    "--listen: a server announces a TCP port, so use a tcp: or ssl: endpoint "
                    "(or --mode client, or --no-discovery)"
                )
        if self["discovery-interface"] is None:
            self["discovery-interface"] = ""
        else:
            self["discovery-interface"] = config.parse_ipv4(
                self["discovery-interface"], "--discovery-interface"
            )
        seconds = ("probe-interval", "health-interval", "connect-timeout", "idle-timeout",
                   "first-byte-timeout", "models-interval", "drain-timeout",
                   "header-timeout")  # fmt: skip
        for name in seconds:
            self[name] = config.parse_seconds(str(self[name]), "--" + name)
        if self["strategy"] not in STRATEGIES:
            raise usage.UsageError(
                f"--strategy: must be one of {', '.join(STRATEGIES)}, not {self['strategy']!r}"
            )
        self["unhealthy-after"] = config.parse_count(str(self["unhealthy-after"]),
                                                     "--unhealthy-after")  # fmt: skip
        self["attempts"] = config.parse_count(str(self["attempts"]), "--attempts", most=10)
        limits = list(environment_limits())
        for i, name in enumerate(("ollama-parallel", "ollama-max-queue", "ollama-max-loaded")):
            if self[name] is not None:
                limits[i] = config.parse_count(str(self[name]), "--" + name, most=1 << 20)
        self["ollama-limits"] = tuple(limits)
        self["scan-limit"] = config.parse_size(str(self["scan-limit"]), "--scan-limit")
        max_body = str(self["max-body"])
        self["max-body"] = (
            None if max_body == "off" else config.parse_size(max_body, "--max-body", most=1 << 50)
        )
        self["max-connections"] = config.parse_count(
            str(self["max-connections"]), "--max-connections", most=100000
        )
        if self["mode"] == "client" and self["no-discovery"] and not self["peer"]:
            raise usage.UsageError("--no-discovery in client mode needs at least one --peer")
        self._check_tls()

    def _check_tls(self) -> None:
        """Load or make the server's certificate and read the clients' CA now, so that a
        problem stops Ollana before it starts, in one line."""
        from ollana import tls

        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        self["server-tls"] = None
        try:
            if cert is not None:
                self["server-tls"] = tls.load_certificate(cert, key)
            elif self["tls"]:
                self["server-tls"] = tls.ensure_self_signed(
                    self["tls-dir"] or tls.default_data_dir(os.environ)
                )
            if self["server-tls"] is not None and self["mode"] != "client":
                listen = self["listen"] or config.SERVER_LISTEN
                self["server-tls"].listen_description(listen)
            if self["tls-ca"] is not None:
                tls.ClientTLS(self["tls-ca"])
        except (tls.TLSSetupError, ValueError) as e:
            raise usage.UsageError(f"--tls: {e}") from None

    def settings(self) -> Settings:
        """The validated options as Settings (looks up broadcast addresses if needed)."""
        discovery = not self["no-discovery"]
        return Settings(
            mode=self["mode"],
            ollama_url=self["ollama"],
            listen=self["listen"],
            discovery=discovery,
            discovery_port=self["discovery-port"],
            discovery_interface=self["discovery-interface"],
            broadcast=self.broadcast_addresses() if discovery else (),
            probe_interval=self["probe-interval"],
            health_interval=self["health-interval"],
            peers=tuple(self["peer"]),
            connect_timeout=self["connect-timeout"],
            idle_timeout=self["idle-timeout"],
            first_byte_timeout=self["first-byte-timeout"],
            strategy=self["strategy"],
            unhealthy_after=self["unhealthy-after"],
            models_interval=self["models-interval"],
            scan_limit=self["scan-limit"],
            attempts=self["attempts"],
            ollama_limits=self["ollama-limits"],
            drain_timeout=self["drain-timeout"],
            secret=self["secret"],
            allow=tuple(self["allow"]) or None,
            max_body=self["max-body"],
            max_connections=self["max-connections"],
            header_timeout=self["header-timeout"],
            tls=self["server-tls"],
            tls_ca=self["tls-ca"],
        )


def makeService(options: Options, reactor: Any = None) -> Any:
    """The Ollana service for twistd, on the global reactor unless given another."""
    from ollana.health import AgentGetter
    from ollana.netif import default_broadcast_addresses
    from ollana.node import HEALTH_TIMEOUT, ConnectionPoolService, OllanaService
    from ollana.tls import ClientTLS
    from ollana.upstream import make_agent

    exit_code_from_failure = reactor is None
    if reactor is None:
        from twisted.internet import reactor

        from ollana.limits import raise_open_files

        raise_open_files()  # first: the listeners' connection caps are sized from it
    settings = options.settings()
    client_tls = ClientTLS(settings.tls_ca)  # pins come from the pool, once there is one
    # Health checks, model lists and merged listings go through the relaying client too:
    # kept-alive connections, and response heads bounded as a hostile server's must be.
    agent = make_agent(reactor, HEALTH_TIMEOUT, client_tls.creator_for)
    service = OllanaService(
        settings, reactor, AgentGetter(agent), default_broadcast_addresses, client_tls
    )
    health_connections = ConnectionPoolService(agent)
    health_connections.setName("health-connections")
    health_connections.setServiceParent(service)
    if exit_code_from_failure:
        atexit.register(_exit_if_failed, service)
        # What start-up made (modules, settings) lives as long as the process: moved out of
        # the cyclic collector's view, full collections no longer stall the proxy for tens
        # of milliseconds (p99 of a small GET at 32 connections: 46 -> 28 ms).
        reactor.callWhenRunning(gc.freeze)
    return service


def _exit_if_failed(service: Any) -> None:
    """twistd exits 0 whatever happened: make a fatal start-up error exit 1."""
    if service.failure is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
