"""ollana.tls: the server's certificate files, its ssl: endpoint, and the clients' checks,
over real TLS connections on 127.0.0.1 (a tiny twisted.web site answers; the clients are
twisted.web Agents whose endpoints use the connection creators under test)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from ollana import tls

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"
Key = ec.EllipticCurvePrivateKey


# Certificates for the tests.


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def new_certificate(
    name: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None = None,
    ca: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> x509.Certificate:
    """A certificate for name, issued by issuer (a CA's certificate and key) or by itself."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = dict.fromkeys(
            ["content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "encipher_only", "decipher_only", "digital_signature"], False,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True
        )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def pem(*items: x509.Certificate | Key) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    return out


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class TestPKI:
    """A CA, an intermediate CA, and files for a server certificate (localhost and
    127.0.0.1) issued by the CA directly and through the intermediate; another CA."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory)
        self.directory = directory
        ca_key = new_key()
        ca = new_certificate("Test CA", ca_key, ca=True)
        other_key = new_key()
        other = new_certificate("Other CA", other_key, ca=True)
        mid_key = new_key()
        mid = new_certificate("Test Intermediate", mid_key, (ca, ca_key), ca=True)
        self.server_key = new_key()
        self.server = new_certificate("server", self.server_key, (ca, ca_key),
                                      dns=["localhost"], ips=["127.0.0.1"])  # fmt: skip
        self.chained = new_certificate("chained", self.server_key, (mid, mid_key),
                                       dns=["localhost"], ips=["127.0.0.1"])  # fmt: skip
        self.nameless = new_certificate("127.0.0.1", self.server_key, (ca, ca_key))
        self.ca = self.file("ca.pem", pem(ca))
        self.other_ca = self.file("other-ca.pem", pem(other))
        self.key_file = self.file("server.key", pem(self.server_key))
        self.cert_file = self.file("server.crt", pem(self.server))
        self.chain_file = self.file("chained.crt", pem(self.chained, mid))

    def file(self, name: str, data: bytes) -> str:
        return write(os.path.join(self.directory, name), data)


# The certificate files.


class DataDirTests(SynchronousTestCase):
    def test_xdg_data_home(self) -> None:
        environ = {"XDG_DATA_HOME": "/data", "HOME": "/home/u"}
        self.assertEqual(tls.default_data_dir(environ), "/data/ollana")

    def test_home(self) -> None:
        self.assertEqual(tls.default_data_dir({"HOME": "/home/u"}), "/home/u/.local/share/ollana")

    def test_relative_xdg_data_home_is_ignored(self) -> None:
        environ = {"XDG_DATA_HOME": "data", "HOME": "/home/u"}
        self.assertEqual(tls.default_data_dir(environ), "/home/u/.local/share/ollana")


class SelfSignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(os.path.abspath(self.mktemp()), "state", "ollana")
        self.key_path = os.path.join(self.dir, "tls.key")
        self.cert_path = os.path.join(self.dir, "tls.crt")

    def test_first_run_makes_a_key_and_a_certificate(self) -> None:
        server = tls.ensure_self_signed(self.dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.key_path).st_mode), 0o600)
        self.assertEqual((server.key_path, server.cert_path), (self.key_path, self.cert_path))
        with open(self.cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        der = cert.public_bytes(serialization.Encoding.DER)
        self.assertEqual(server.fingerprint, hashlib.sha256(der).digest())
        self.assertEqual(len(server.fingerprint), 32)
        self.assertEqual(server.fingerprint_hex, hashlib.sha256(der).hexdigest())
        name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(name, "ollana")
        self.assertEqual(cert.issuer, cert.subject)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreater(lifetime, datetime.timedelta(days=9 * 365))
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)

    def test_later_runs_load_the_same(self) -> None:
        first = tls.ensure_self_signed(self.dir)
        with open(self.key_path, "rb") as f:
            key = f.read()
        second = tls.ensure_self_signed(self.dir)
        self.assertEqual(second.fingerprint, first.fingerprint)
        with open(self.key_path, "rb") as f:
            self.assertEqual(f.read(), key)

    def test_missing_certificate_is_made_again_from_the_key(self) -> None:
        first = tls.ensure_self_signed(self.dir)
        os.remove(self.cert_path)
        second = tls.ensure_self_signed(self.dir)
        self.assertTrue(os.path.exists(self.cert_path))
        der, info = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        self.assertEqual(
            second.certificate.public_key().public_bytes(der, info),
            first.certificate.public_key().public_bytes(der, info),
        )

    def test_corrupt_key(self) -> None:
        os.makedirs(self.dir)
        write(self.key_path, b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n")
        e = self.assertRaises(tls.TLSSetupError, tls.ensure_self_signed, self.dir)
        self.assertIn(self.key_path, str(e))
        self.assertEqual(str(e), f"{self.key_path}: not a valid PEM private key")
        self.assertFalse(os.path.exists(self.cert_path))  # nothing was replaced or made

    def test_corrupt_certificate(self) -> None:
        tls.ensure_self_signed(self.dir)
        write(self.cert_path, b"garbage")
        e = self.assertRaises(tls.TLSSetupError, tls.ensure_self_signed, self.dir)
        self.assertIn(self.cert_path, str(e))
        self.assertEqual(str(e), f"{self.cert_path}: not a valid PEM certificate")

    def test_certificate_of_another_key(self) -> None:
        tls.ensure_self_signed(self.dir)
        write(self.cert_path, pem(new_certificate("ollana", new_key())))
        e = self.assertRaises(tls.TLSSetupError, tls.ensure_self_signed, self.dir)
        self.assertIn("does not belong", str(e))

    def test_unreadable_key(self) -> None:
        os.makedirs(self.key_path)  # a directory: unreadable as a file, even for root
        e = self.assertRaises(tls.TLSSetupError, tls.ensure_self_signed, self.dir)
        self.assertIn(f"{self.key_path}: cannot read private key", str(e))

    def test_encrypted_key(self) -> None:
        os.makedirs(self.dir)
        key = new_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        write(self.key_path, key)
        e = self.assertRaises(tls.TLSSetupError, tls.ensure_self_signed, self.dir)
        self.assertIn("encrypted private keys are not supported", str(e))

    def test_ca_issued_certificate_and_key(self) -> None:
        pki = TestPKI(self.mktemp())
        server = tls.load_certificate(pki.chain_file, pki.key_file)
        self.assertEqual(server.certificate, pki.chained)
        self.assertEqual(len(server.chain), 1)
        e = self.assertRaises(tls.TLSSetupError, tls.load_certificate, pki.ca, pki.key_file)
        self.assertIn("does not belong", str(e))
        missing = os.path.join(pki.directory, "missing.key")
        e = self.assertRaises(tls.TLSSetupError, tls.load_certificate, pki.cert_file, missing)
        self.assertIn(f"{missing}: cannot read private key", str(e))


class ListenDescriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(os.path.abspath(self.mktemp()), "a:b")  # a colon to quote
        self.server = tls.ensure_self_signed(self.dir)

    def listen(self, description: str) -> tuple[Any, ...]:
        memory = MemoryReactor()
        serverFromString(memory, description).listen(Site(Resource()))
        self.assertEqual(len(memory.sslServers), 1)
        return memory.sslServers[0]

    def test_tcp_becomes_ssl(self) -> None:
        description = self.server.listen_description("tcp:11435")
        self.assertTrue(description.startswith("ssl:11435:certKey="))
        self.assertIn("a\\:b", description)
        port, _, context_factory, _, interface = self.listen(description)
        self.assertEqual((port, interface), (11435, ""))
        self.assertEqual(context_factory.certificate.to_cryptography(), self.server.certificate)

    def test_interface_and_backlog_kept(self) -> None:
        for listen in ("tcp:0:interface=127.0.0.1:backlog=7", "tcp:0:127.0.0.1:7",
                       "tcp:port=0:backlog=7:interface=127.0.0.1"):  # fmt: skip
            port, _, _, backlog, interface = self.listen(self.server.listen_description(listen))
            self.assertEqual((port, backlog, interface), (0, 7, "127.0.0.1"))

    def test_tcp6(self) -> None:
        _, _, _, _, interface = self.listen(self.server.listen_description("tcp6:11435"))
        self.assertEqual(interface, "::")
        listen = "tcp6:11435:interface=\\:\\:1"
        _, _, _, _, interface = self.listen(self.server.listen_description(listen))
        self.assertEqual(interface, "::1")

    def test_other_kinds_refused(self) -> None:
        for listen in ("unix:/tmp/x", "ssl:443", "tcp:1:2:3:4", "tcp:1:reuse=yes", "tcp"):
            self.assertRaises(ValueError, self.server.listen_description, listen)


# Over the wire.


class CountingWrapper(ProtocolWrapper):
    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)
        super().dataReceived(data)


class Tracked(WrappingFactory):
    """Wraps a factory: counts the bytes its connections receive and tells when all of
    them are closed (sockets and all: the wrapper's connectionLost comes from TCP)."""

    protocol = CountingWrapper

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.received = 0
        self.opened = 0
        self._idle: list[defer.Deferred[None]] = []

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        self.opened += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def closed(self) -> defer.Deferred[None]:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


@implementer(IStreamClientEndpoint)
class TrackedEndpoint:
    def __init__(self, inner: IStreamClientEndpoint, tracked: list[Tracked]) -> None:
        self._inner = inner
        self._tracked = tracked

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        tracked = Tracked(factory)
        self._tracked.append(tracked)
        connecting: defer.Deferred[Any] = self._inner.connect(tracked)
        return connecting.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class Endpoints:
    """127.0.0.1 whatever the URL's host (which the creator is made for), in TLS for https."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator | None) -> None:
        self.creator = creator
        self.tracked: list[Tracked] = []

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port, timeout=5)
        endpoint: IStreamClientEndpoint = TrackedEndpoint(tcp, self.tracked)
        if uri.scheme == b"https":
            assert self.creator is not None
            endpoint = wrapClientTLS(self.creator, endpoint)
        return endpoint


class Hello(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render_GET(self, request: Request) -> bytes:
        self.requests += 1
        return b"hello over TLS"


def reasons(failure: Failure) -> list[Failure]:
    """The failures inside the agent's ResponseNeverReceived (and friends)."""
    inner = getattr(failure.value, "reasons", None)
    if not inner:
        return [failure]
    return [leaf for reason in inner for leaf in reasons(reason)]


class LoopbackTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.hello = Hello()
        self.pki = TestPKI(os.path.abspath(self.mktemp()))

    async def serve(self, server: tls.ServerCertificate, endpoint: Any = None) -> int:
        if endpoint is None:
            endpoint = serverFromString(reactor, server.listen_description(LOOPBACK))
        self.server_side = Tracked(Site(self.hello))
        port: IListeningPort = await endpoint.listen(self.server_side)
        self.addCleanup(self.server_side.closed)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined]

    async def get(
        self, port: int, creator: IOpenSSLClientConnectionCreator | None, host: str = "127.0.0.1"
    ) -> bytes:
        endpoints = Endpoints(creator)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        scheme = "http" if creator is None else "https"
        url = f"{scheme}://{host}:{port}/".encode("ascii")
        try:
            response = await agent.request(b"GET", url)
            self.assertEqual(response.code, 200)
            return await readBody(response)
        finally:
            for tracked in endpoints.tracked:
                self.addCleanup(tracked.closed)

    async def refused(
        self, port: int, creator: IOpenSSLClientConnectionCreator | None, host: str = "127.0.0.1"
    ) -> list[Failure]:
        """Asks, expects the request to fail, checks the server saw none of it."""
        before = (self.hello.requests, self.server_side.received)
        try:
            await self.get(port, creator, host)
        except Exception:
            failures = reasons(Failure())
        else:
            self.fail("the request went through")
        await self.server_side.closed()
        # No request, not a byte of one, reached the server's site.
        self.assertEqual((self.hello.requests, self.server_side.received), before)
        return failures

    async def test_pinned_fingerprint(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        body = await self.get(port, tls.pinned_client_tls(server.fingerprint, "127.0.0.1"))
        self.assertEqual(body, b"hello over TLS")
        self.assertEqual(self.hello.requests, 1)

    async def test_wrong_fingerprint(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        pin = hashlib.sha256(b"some other certificate").digest()
        failures = await self.refused(port, tls.pinned_client_tls(pin, "10.0.0.7"))
        mismatches = [f for f in failures if f.check(tls.FingerprintMismatch)]
        self.assertEqual(len(mismatches), 1, failures)
        message = mismatches[0].getErrorMessage()
        self.assertEqual(
            message,
            f"certificate fingerprint mismatch for 10.0.0.7: expected {pin.hex()}, "
            f"got {server.fingerprint_hex}",
        )

    async def test_pin_checked_again_when_the_handshake_ends(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        pin = hashlib.sha256(b"some other certificate").digest()
        creator: Any = tls.pinned_client_tls(pin, "127.0.0.1")
        creator._check = lambda *args: None  # as if the verify callback had let it through
        failures = await self.refused(port, creator)
        self.assertTrue(any(f.check(tls.FingerprintMismatch) for f in failures), failures)

    async def test_pin_of_a_ca_issued_certificate(self) -> None:
        server = tls.load_certificate(self.pki.cert_file, self.pki.key_file)
        port = await self.serve(server)
        body = await self.get(port, tls.pinned_client_tls(server.fingerprint, "127.0.0.1"))
        self.assertEqual(body, b"hello over TLS")

    async def test_plain_http_to_the_tls_port_fails(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        await self.refused(port, None)

    async def test_no_pin_no_ca_is_refused(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        failures = await self.refused(port, tls.ClientTLS().creator("127.0.0.1", None))
        rejected = [f for f in failures if f.check(tls.CertificateRejected)]
        self.assertEqual(len(rejected), 1, failures)
        self.assertEqual(
            rejected[0].getErrorMessage(),
            "certificate of 127.0.0.1 is not trusted by the system's CAs: self-signed certificate",
        )

    async def test_ca_issued_by_address(self) -> None:
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        body = await self.get(port, tls.ca_client_tls("127.0.0.1", self.pki.ca))
        self.assertEqual(body, b"hello over TLS")

    async def test_ca_issued_by_name(self) -> None:
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        body = await self.get(port, tls.ca_client_tls("localhost", self.pki.ca), "localhost")
        self.assertEqual(body, b"hello over TLS")

    async def test_ca_issued_through_an_intermediate(self) -> None:
        server = tls.load_certificate(self.pki.chain_file, self.pki.key_file)
        port = await self.serve(server)
        body = await self.get(port, tls.ca_client_tls("127.0.0.1", self.pki.ca))
        self.assertEqual(body, b"hello over TLS")

    async def test_server_options_endpoint(self) -> None:
        server = tls.load_certificate(self.pki.chain_file, self.pki.key_file)
        endpoint = SSL4ServerEndpoint(reactor, 0, server.server_options(), interface="127.0.0.1")
        port = await self.serve(server, endpoint)
        body = await self.get(port, tls.ca_client_tls("127.0.0.1", self.pki.ca))
        self.assertEqual(body, b"hello over TLS")

    async def test_another_ca_fails(self) -> None:
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        failures = await self.refused(port, tls.ca_client_tls("127.0.0.1", self.pki.other_ca))
        rejected = [f for f in failures if f.check(tls.CertificateRejected)]
        self.assertEqual(len(rejected), 1, failures)
        self.assertEqual(
            rejected[0].getErrorMessage(),
            f"certificate of 127.0.0.1 is not trusted by the CA in {self.pki.other_ca}: "
            "unable to get local issuer certificate",
        )

    async def test_self_signed_against_a_ca_fails(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        failures = await self.refused(port, tls.ca_client_tls("127.0.0.1", self.pki.ca))
        self.assertTrue(any(f.check(tls.CertificateRejected) for f in failures), failures)

    async def test_wrong_name_fails(self) -> None:
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        creator = tls.ca_client_tls("ollana.example", self.pki.ca)
        failures = await self.refused(port, creator, "ollana.example")
        rejected = [f for f in failures if f.check(tls.CertificateRejected)]
        self.assertEqual(len(rejected), 1, failures)
        self.assertEqual(
            rejected[0].getErrorMessage(),
            "certificate is not for ollana.example: it names localhost, 127.0.0.1",
        )

    async def test_certificate_without_names_fails(self) -> None:
        write(self.pki.cert_file, pem(self.pki.nameless))
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        failures = await self.refused(port, tls.ca_client_tls("127.0.0.1", self.pki.ca))
        rejected = [f for f in failures if f.check(tls.CertificateRejected)]
        self.assertEqual(len(rejected), 1, failures)
        self.assertEqual(
            rejected[0].getErrorMessage(),
            "certificate is not for 127.0.0.1: it names no subjectAltName",
        )

    async def test_wrong_address_fails(self) -> None:
        port = await self.serve(tls.load_certificate(self.pki.cert_file, self.pki.key_file))
        failures = await self.refused(port, tls.ca_client_tls("10.0.0.7", self.pki.ca))
        self.assertTrue(any(f.check(tls.CertificateRejected) for f in failures), failures)

    async def test_client_policy(self) -> None:
        server = tls.ensure_self_signed(os.path.abspath(self.mktemp()))
        port = await self.serve(server)
        pins = {("127.0.0.1", port): server.fingerprint}
        pinned = tls.ClientTLS(pins=lambda host, port: pins.get((host, port)))
        creator = pinned.creator_for("127.0.0.1", port)
        self.assertIs(pinned.creator("127.0.0.1", server.fingerprint), creator)
        self.assertEqual(await self.get(port, creator), b"hello over TLS")
        # No pin for that port: the system's CAs, which do not know this certificate.
        await self.refused(port, pinned.creator_for("127.0.0.1", port + 1))
        # With a CA, the CA decides: an announced fingerprint does not let a server in.
        with_ca = tls.ClientTLS(self.pki.ca)
        await self.refused(port, with_ca.creator("127.0.0.1", server.fingerprint))


class ClientSetupTests(SynchronousTestCase):
    def test_fingerprint_size(self) -> None:
        self.assertRaises(ValueError, tls.pinned_client_tls, b"short", "127.0.0.1")

    def test_bad_ca_file(self) -> None:
        path = write(os.path.abspath(self.mktemp()), b"not a certificate")
        e = self.assertRaises(tls.TLSSetupError, tls.ClientTLS, path)
        self.assertEqual(str(e), f"{path}: not a valid PEM CA certificate")
        missing = path + ".missing"
        e = self.assertRaises(tls.TLSSetupError, tls.ca_client_tls, "localhost", missing)
        self.assertIn(f"{missing}: cannot read CA certificate", str(e))
