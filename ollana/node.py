"""The running Ollana: its services in server and client mode, and the auto choice.

tap.makeService builds an OllanaService; in auto mode the service asks the local
Ollama first and builds the server or client services once it knows. The status pages
read it as an INodeStatus.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IMulticastTransport,
    IProtocolFactory,
    IReactorCore,
    IReactorMulticast,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from ollana import __version__
from ollana.access import CHECK_HEADER
from ollana.auth import CREDENTIAL_HEADER, PacketAuth, request_credential
from ollana.config import Settings, endpoint_scheme, with_backlog
from ollana.discovery import AnnouncementListener, ProbeResponder, Seeker, Targets
from ollana.gate import Gate
from ollana.health import (
    HTTPGetter,
    LocalOllamaMonitor,
    OllamaProbe,
    PeerHealthChecker,
    choose_mode,
)
from ollana.httpclient import UpstreamAgent
from ollana.interfaces import JSON, INodeStatus, IRouter, IServerState, JSONObject
from ollana.listings import MergedListings
from ollana.load import OllamaLoad
from ollana.metrics import Metrics, discovery_metrics, load_metrics, peer_metrics
from ollana.origins import OriginPolicy
from ollana.peers import PeerPool
from ollana.proxy import ProxySettings
from ollana.routing import LocalRouter, PoolRouter, take_report
from ollana.site import ProxySite
from ollana.status import StatusPages, peer_status, state_status
from ollana.tls import ClientTLS
from ollana.upstream import TLSPolicy, make_agent

if TYPE_CHECKING:  # imported at the first scrape, by ollana.metrics
    from prometheus_client import CollectorRegistry

log = Logger()

HEALTH_TIMEOUT = 3.0
LISTING_TIMEOUT = 10.0
ErrorReporter = Callable[[str], None]
BroadcastLookup = Callable[[], list[str]]


def broadcast_targets(settings: Settings, find_broadcast: BroadcastLookup) -> Targets:
    """Where discovery broadcasts go: the given addresses, or this machine's at that moment
    (so that a network that comes up after Ollana is used without a restart)."""

    def targets() -> list[tuple[str, int]]:
        addresses = settings.broadcast if settings.broadcast is not None else find_broadcast()
        return [(address, settings.discovery_port) for address in addresses]

    return targets


def describe_listen_error(e: error.CannotListenError, what: str, option: str) -> str:
    """One line naming the port, the reason and the option that changes it."""
    reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
    where = f" on {e.interface}" if e.interface else ""
    return f"Cannot listen on {what} port {e.port}{where}: {reason}. Choose another with {option}."


def packet_auth(settings: Settings, clock: IReactorTime) -> PacketAuth | None:
    """What signs and checks this node's discovery datagrams, when there is a secret."""
    return PacketAuth(settings.secret, clock) if settings.secret is not None else None


class HTTPListener(Service):
    """Listens for HTTP on an endpoint description and tells when and where it listens.
    Stopped, it stops accepting and lets the requests under way finish (up to a limit).
    (The reactor is also an IReactorSSL or IReactorUNIX for ssl: and unix: descriptions.)"""

    def __init__(
        self,
        reactor: IReactorTCP,
        description: str,
        factory: IProtocolFactory,
        on_error: ErrorReporter,
        drain_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self.description = description
        self._factory = factory
        self._on_error = on_error
        self.drain_timeout = drain_timeout
        self.port: IListeningPort | None = None
        self._waiting: list[defer.Deferred[int]] = []

    def startService(self) -> None:
        super().startService()
        try:
            endpoint = serverFromString(self._reactor, with_backlog(self.description))
        except Exception:  # what config.check_endpoint cannot see: a bad certificate, say
            self._failed(Failure())
            return
        endpoint.listen(self._factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        if not self.running:  # stopped before the endpoint was ready
            port.stopListening()
            return
        self.port = port
        address = port.getHost()
        log.info(
            "Listening for HTTP on {host}:{port}",
            host=getattr(address, "host", address),
            port=getattr(address, "port", None),
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port.getHost().port)  # type: ignore[attr-defined]

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, error.CannotListenError):
            self._on_error(describe_listen_error(failure.value, "TCP", "--listen"))
        else:
            self._on_error(f"Cannot listen on {self.description}: {failure.getErrorMessage()}")

    def whenListening(self) -> defer.Deferred[int]:
        """Fires with the bound TCP port number once listening."""
        if self.port is not None:
            return defer.succeed(self.port.getHost().port)  # type: ignore[attr-defined]
        d: defer.Deferred[int] = defer.Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> defer.Deferred[list[None]]:
        super().stopService()
        port, self.port = self.port, None
        stopping: list[defer.Deferred[None]] = []
        if port is not None:
            stopping.append(stop_listening(port))
        if isinstance(self._factory, ProxySite):
            stopping.append(self._factory.drain(self.drain_timeout))
        return defer.gatherResults(stopping)


def stop_listening(port: IListeningPort | IUDPTransport) -> defer.Deferred[None]:
    """port.stopListening(), as a Deferred also when the port has stopped at once."""
    try:
        stopping = port.stopListening()
    except Exception:
        return defer.fail()
    return defer.succeed(None) if stopping is None else stopping


def listen_shared(
    reactor: IReactorMulticast,
    settings: Settings,
    protocol: DatagramProtocol,
    on_error: ErrorReporter,
) -> IMulticastTransport | None:
    """Bind the discovery port, shared with other processes; None (reported) if it fails."""
    try:
        return reactor.listenMulticast(
            settings.discovery_port,
            protocol,
            interface=settings.discovery_interface,
            listenMultiple=True,
        )
    except error.CannotListenError as e:
        on_error(describe_listen_error(e, "UDP", "--discovery-port"))
        return None


class ResponderService(Service):
    """Server side of discovery: the responder on the shared discovery port."""

    def __init__(
        self,
        reactor: IReactorMulticast,
        responder: ProbeResponder,
        settings: Settings,
        listener: HTTPListener,
        on_error: ErrorReporter,
    ) -> None:
        self._reactor = reactor
        self.responder = responder
        self._settings = settings
        self._listener = listener
        self._on_error = on_error
        self._port: IMulticastTransport | None = None

    def startService(self) -> None:
        super().startService()
        self._port = listen_shared(self._reactor, self._settings, self.responder, self._on_error)
        if self._port is None:
            return
        self._port.setBroadcastAllowed(True)
        self._listener.whenListening().addCallback(self._ready)

    def _ready(self, proxy_port: int) -> None:
        if self._port is None:
            return
        self.responder.proxy_port = proxy_port
        self.responder.announce()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        self.responder.bye()
        return stop_listening(port)


class SeekerService(Service):
    """Client side of discovery: probes every interval, hears announcements, expires peers."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,  # also the IReactorUDP and IReactorMulticast it listens on
        pool: PeerPool,
        settings: Settings,
        targets: Targets,
        on_error: ErrorReporter,
    ) -> None:
        self._reactor = reactor
        self.pool = pool
        self._settings = settings
        self._on_error = on_error
        auth = packet_auth(settings, reactor)
        self.seeker = Seeker(settings.node_id, pool, targets, clock=reactor, auth=auth)
        self.listener = AnnouncementListener(settings.node_id, pool, clock=reactor, auth=auth)
        self._ports: list[IUDPTransport] = []
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        shared = listen_shared(
            IReactorMulticast(self._reactor), self._settings, self.listener, self._on_error
        )
        if shared is None:
            return
        self._ports.append(shared)
        try:
            own = IReactorUDP(self._reactor).listenUDP(
                0, self.seeker, interface="", maxPacketSize=8192
            )
        except error.CannotListenError as e:
            self._on_error(f"Cannot open a UDP socket for discovery probes: {e.socketError}")
            return
        probes = IUDPTransport(own)
        probes.setBroadcastAllowed(True)
        self._ports.append(probes)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._reactor
        self._loop.start(self._settings.probe_interval, now=True)

    def tick(self) -> None:
        """Expire silent peers and probe again; errors are logged, never raised."""
        try:
            self.pool.expire()
            self.seeker.probe()
        except Exception:
            self.log.failure("Error in the discovery loop")

    def stopService(self) -> defer.Deferred[list[None]]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        ports, self._ports = self._ports, []
        return defer.gatherResults([stop_listening(p) for p in ports])


class WithHeaders:
    """An HTTP getter that adds headers to every request (the credential, in client mode)."""

    def __init__(self, http: HTTPGetter, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._http = http
        self._headers = {name: [value] for name, value in headers}

    def get(
        self, url: str, /, headers: Mapping[bytes, list[bytes]] | None = None
    ) -> defer.Deferred[IResponse]:
        return self._http.get(url, headers={**self._headers, **(headers or {})})


class ConnectionPoolService(Service):
    """Closes the proxy's kept-alive upstream connections when Ollana stops."""

    def __init__(self, pool: UpstreamAgent) -> None:
        self._pool = pool

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()


@dataclass
class Observed:
    """What the proxy reports to, and what it serves under /ollana/."""

    metrics: Metrics = field(default_factory=Metrics)
    pages: Resource | None = None


@dataclass
class ModeServices:
    """The services of one mode, and those of them the node reads for its status and
    metrics."""

    services: list[IService]
    listener: HTTPListener
    monitor: LocalOllamaMonitor | None = None  # server mode's
    load: OllamaLoad | None = None  # server mode's
    discovery: list[AnnouncementListener | ProbeResponder] = field(default_factory=list)


def proxy_services(
    settings: Settings,
    reactor: IReactorTime,  # also the IReactorTCP the agent connects with
    router: IRouter,
    observed: Observed,
    gate: Gate,
    upstream_headers: Sequence[tuple[bytes, bytes]] = (),
    tls_for: TLSPolicy | None = None,
) -> tuple[ProxySite, ConnectionPoolService]:
    """The proxying site for the HTTP listener, and the service that owns its connections."""
    agent = make_agent(reactor, settings.connect_timeout, tls_for)
    proxy = ProxySettings(
        agent=agent,
        router=router,
        clock=reactor,
        idle_timeout=settings.idle_timeout,
        first_byte_timeout=settings.first_byte_timeout,
        retry_after=settings.probe_interval,
        metrics=observed.metrics,
        gate=gate,
        upstream_headers=upstream_headers,
    )
    connections = ConnectionPoolService(agent)
    connections.setName("upstream-connections")
    return ProxySite(proxy, observed.pages), connections


def build_server(
    settings: Settings,
    reactor: IReactorTime,  # also the IReactorTCP and IReactorMulticast it listens on
    http: HTTPGetter,
    find_broadcast: BroadcastLookup,
    on_error: ErrorReporter,
    observed: Observed,
) -> ModeServices:
    """The local Ollama monitor, the LAN listener and the discovery responder."""
    probe = OllamaProbe(http, reactor, settings.ollama_url)
    monitor = LocalOllamaMonitor(probe, reactor, settings.health_interval, HEALTH_TIMEOUT)
    monitor.setName("ollama-monitor")
    listen = settings.listen_for("server")
    fingerprint = None
    if settings.tls is not None:
        listen = settings.tls.listen_description(listen)
        fingerprint = settings.tls.fingerprint
        log.info("Serving HTTPS with {path}, SHA-256 fingerprint {fingerprint}",
                 path=settings.tls.cert_path, fingerprint=settings.tls.fingerprint_hex)  # fmt: skip
    parallel, max_queue, max_loaded = settings.ollama_limits
    load = OllamaLoad(probe, reactor, settings.health_interval, HEALTH_TIMEOUT, parallel,
                      max_queue, max_loaded, settings.secret)  # fmt: skip
    load.setName("ollama-load")
    router = LocalRouter(settings.ollama_url, monitor, load)
    gate = Gate(
        allow=settings.allow,
        open_to_all=False,
        secret=settings.secret,
        max_body=settings.max_body,
        max_connections_per_source=settings.max_connections,
        header_timeout=settings.header_timeout,
    )
    site, connections = proxy_services(settings, reactor, router, observed, gate)
    listener = HTTPListener(IReactorTCP(reactor), listen, site, on_error, settings.drain_timeout)
    listener.setName("http")
    built = ModeServices([monitor, load, connections, listener], listener, monitor, load)
    if settings.discovery:
        responder = ProbeResponder(
            settings.node_id,
            broadcast_targets(settings, find_broadcast),
            endpoint_scheme(listen),
            __version__,
            lambda: monitor.healthy,
            auth=packet_auth(settings, reactor),
            allowed=gate.admits_source,
            fingerprint=fingerprint,
            clock=reactor,
        )
        monitor.watch(responder.announce, lambda reason: responder.bye())
        discovery = ResponderService(IReactorMulticast(reactor), responder, settings, listener,
                                     on_error)  # fmt: skip
        discovery.setName("discovery")
        built.services.append(discovery)
        built.discovery = [responder]
    return built


def build_client(
    settings: Settings,
    reactor: IReactorTime,  # also the IReactorTCP, IReactorUDP and IReactorMulticast it uses
    pool: PeerPool,
    http: HTTPGetter,
    find_broadcast: BroadcastLookup,
    on_error: ErrorReporter,
    observed: Observed,
    tls_for: TLSPolicy | None = None,
) -> ModeServices:
    """The discovery seeker (unless disabled), the health checker and the local listener."""
    for host, port, scheme in settings.peers:
        pool.add_static(host, port, scheme)
    credential: list[tuple[bytes, bytes]] = []
    if settings.secret is not None:
        credential = [(CREDENTIAL_HEADER, request_credential(settings.secret))]
    checks = WithHeaders(http, [*credential, (CHECK_HEADER, b"health")])  # logged at debug
    if credential:
        http = WithHeaders(http, credential)
    services: list[IService] = []
    discovery: list[AnnouncementListener | ProbeResponder] = []
    if settings.discovery:
        targets = broadcast_targets(settings, find_broadcast)
        seeker = SeekerService(reactor, pool, settings, targets, on_error)
        seeker.setName("discovery")
        services.append(seeker)
        discovery = [seeker.seeker, seeker.listener]
    secret = settings.secret
    checker = PeerHealthChecker(pool, checks, reactor, settings.health_interval, HEALTH_TIMEOUT,
                                settings.models_interval,
                                on_report=lambda peer, h: take_report(peer, h, secret))  # fmt: skip
    checker.setName("health")
    listings = MergedListings(pool, http, reactor, LISTING_TIMEOUT)
    router = PoolRouter(pool, checker, listings, settings.strategy, settings.attempts,
                        settings.scan_limit, secret)  # fmt: skip
    try:
        origins = OriginPolicy.from_env(os.environ)  # the apps' Ollama: browsers as it has them
    except ValueError as e:
        on_error(f"OLLAMA_ORIGINS: {e}")  # Ollama itself would not start with it
        origins = OriginPolicy()
    gate = Gate(max_body=settings.max_body, header_timeout=settings.header_timeout,
                check_host=True, origins=origins)  # fmt: skip
    site, connections = proxy_services(settings, reactor, router, observed, gate, credential,
                                       tls_for)  # fmt: skip
    listener = HTTPListener(IReactorTCP(reactor), settings.listen_for("client"), site, on_error,
                            settings.drain_timeout)  # fmt: skip
    listener.setName("http")
    services += [checker, connections, listener]
    return ModeServices(services, listener, discovery=discovery)


def peer_pool(settings: Settings, clock: IReactorTime) -> PeerPool:
    """The servers a client knows. Announcements are believed from the sources a server
    would admit."""
    admits = Gate(allow=settings.allow, open_to_all=False).admits_source
    return PeerPool(clock, 3 * settings.probe_interval, settings.unhealthy_after, admits)


@implementer(INodeStatus)
class OllanaService(MultiService):
    """One Ollana node; in auto mode it picks server or client when it starts.

    Its pool of servers and its client TLS (which pins what those servers announce) are
    made here unless given: ``peer_pool(settings, reactor)``, and ``ClientTLS`` with
    ``pins=pool.fingerprint``.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor: IReactorTime,  # also the IReactorTCP, IReactorUDP, IReactorMulticast it uses
        http: HTTPGetter,
        find_broadcast: BroadcastLookup,
        client_tls: ClientTLS | None = None,
        pool: PeerPool | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self._http = http
        self._find_broadcast = find_broadcast
        self.pool = pool if pool is not None else peer_pool(settings, reactor)
        if client_tls is None:
            client_tls = ClientTLS(settings.tls_ca, pins=self.pool.fingerprint)
        self.client_tls = client_tls
        self.mode: str | None = None
        self.failure: str | None = None
        self._choosing: defer.Deferred[tuple[str, str]] | None = None
        self._services: ModeServices | None = None  # once the mode is known
        self.started: float | None = None
        self.observed = Observed(pages=StatusPages(self))
        self.observed.metrics.watch(lambda: peer_metrics(self.pool))
        self.observed.metrics.watch(lambda: discovery_metrics(self._discovery_protocols()))
        self.observed.metrics.watch(lambda: load_metrics(self._load_report()))
        if settings.mode != "auto":
            self._become(settings.mode)

    def _discovery_protocols(self) -> list[AnnouncementListener | ProbeResponder]:
        return self._services.discovery if self._services is not None else []

    def _load_report(self) -> IServerState | None:
        """Server mode's load report now (None in client mode)."""
        load = self._services.load if self._services is not None else None
        return load.report() if load is not None else None

    @property
    def registry(self) -> CollectorRegistry:
        """The node's metrics, for /ollana/metrics."""
        return self.observed.metrics.registry

    def whenListening(self) -> defer.Deferred[int]:
        """Fires with the TCP port the node listens on for HTTP, once it does (its mode must
        be known: given, or chosen in auto mode)."""
        if self._services is None:
            return defer.fail(RuntimeError("no mode yet: nothing listens"))
        return self._services.listener.whenListening()

    def address(self) -> IAddress | None:
        """Where the node listens for HTTP, once it does."""
        port = self._services.listener.port if self._services is not None else None
        return port.getHost() if port is not None else None

    def status(self) -> JSONObject:
        """What this node is doing, as /ollana/api/status and ollana status show it."""
        now = self._reactor.seconds()
        address = self.address()
        monitor = self._services.monitor if self._services is not None else None
        listen = self.settings.listen_for(self.mode or "client")
        if isinstance(address, IPv4Address | IPv6Address):
            listen = f"{address.host}:{address.port}"
        return {
            "mode": self.mode or "choosing",
            "node_id": self.settings.node_id.hex(),
            "version": __version__,
            "uptime_s": round(now - self.started, 1) if self.started is not None else 0.0,
            "listen": listen,
            "ollama": None
            if monitor is None
            else {
                "url": monitor.url,
                "healthy": monitor.healthy,
                "version": monitor.version,
                "reason": monitor.reason,
            },
            "peers": [peer_status(peer, now) for peer in self.pool if self.mode == "client"],
            "state": state_status(self._load_report()),
        }

    def ollama_models(self) -> defer.Deferred[JSON]:
        """The local Ollama's /api/tags, for the status of a server."""
        probe = OllamaProbe(self._http, self._reactor, self.settings.ollama_url)
        return probe.json("/api/tags", HEALTH_TIMEOUT)

    def _become(self, mode: str) -> None:
        self.mode = mode
        if mode == "server":
            self._services = build_server(
                self.settings, self._reactor, self._http, self._find_broadcast, self.fail,
                self.observed,
            )  # fmt: skip
        else:
            self._services = build_client(
                self.settings, self._reactor, self.pool, self._http, self._find_broadcast,
                self.fail, self.observed, self.client_tls.creator_for,
            )  # fmt: skip
        for service in self._services.services:
            service.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.started = self._reactor.seconds()
        if self.mode is None and self._choosing is None:
            probe = OllamaProbe(self._http, self._reactor, self.settings.ollama_url)
            choosing = defer.Deferred.fromCoroutine(choose_mode(probe, self._reactor))
            self._choosing = choosing
            choosing.addCallback(self._chosen)
            choosing.addErrback(self._choice_failed)

    def _chosen(self, choice: tuple[str, str]) -> None:
        self._choosing = None
        mode, reason = choice
        self.log.info("Auto mode: {mode} mode, because {reason}", mode=mode, reason=reason)
        if self.running:
            self._become(mode)

    def _choice_failed(self, failure: Failure) -> None:
        self._choosing = None
        if not failure.check(defer.CancelledError):
            self.log.failure("Could not choose a mode", failure)
            self.fail("Could not choose a mode: " + failure.getErrorMessage())

    def stopService(self) -> defer.Deferred[object]:
        if self._choosing is not None:
            self._choosing.cancel()
        stopping: defer.Deferred[object] = super().stopService()
        return stopping

    def fail(self, message: str) -> None:
        """A fatal start-up problem: say it in one line and stop."""
        self.failure = message
        self.log.critical("{message}", message=message)
        if IReactorCore.providedBy(self._reactor):
            IReactorCore(self._reactor).callWhenRunning(self._stop_reactor)

    def _stop_reactor(self) -> None:
        reactor = IReactorCore(self._reactor)
        if reactor.running:
            reactor.stop()
