"""TLS between Ollana clients and servers: the server's certificate, the clients' checks.

A server either makes itself a self-signed certificate on its first run
(``ensure_self_signed``), whose SHA-256 fingerprint its announcements carry, or uses one
a CA issued (``load_certificate``). It serves HTTPS on the endpoint description
``ServerCertificate.listen_description`` turns its ``tcp:`` one into.

A client checks a server during the TLS handshake, before it sends a byte of its
request: against the announced fingerprint (``pinned_client_tls``), or against a CA's
certificate and the server's address or name (``ca_client_tls``, service_identity).
``ClientTLS`` picks between the two for each server. A server that fails the check is a
failed connection whose reason (a ``CertificateRejected``) says why in one line; there
is no fallback to plain HTTP.
"""

from __future__ import annotations

import datetime
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ollana.config import split_description

log = Logger()

KEY_FILE = "tls.key"
CERT_FILE = "tls.crt"
COMMON_NAME = "ollana"
VALIDITY = datetime.timedelta(days=3650)
FINGERPRINT_SIZE = 32  # SHA-256

# The keys a server certificate may have here.
PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)  # fmt: skip


class TLSSetupError(Exception):
    """A certificate, key or CA file cannot be used; the message says which and why."""


class CertificateRejected(Exception):
    """A server's certificate failed the client's check; the connection was dropped."""


class FingerprintMismatch(CertificateRejected):
    """A server's certificate is not the one its announcement pinned."""

    def __init__(self, host: str, expected: bytes, got: bytes) -> None:
        super().__init__(
            f"certificate fingerprint mismatch for {host}: expected "
            f"{fingerprint_hex(expected)}, got {fingerprint_hex(got)}"
        )
        self.host = host
        self.expected = expected
        self.got = got


def fingerprint_hex(fingerprint: bytes) -> str:
    """A fingerprint as lowercase hex, as log lines show it."""
    return fingerprint.hex()


def fingerprint_of(certificate: x509.Certificate) -> bytes:
    """The SHA-256 of a certificate's DER encoding (32 bytes)."""
    return certificate.fingerprint(hashes.SHA256())


def default_data_dir(environ: Mapping[str, str]) -> str:
    """Where Ollana keeps its own files: $XDG_DATA_HOME/ollana, else
    ~/.local/share/ollana (a relative XDG_DATA_HOME is ignored, as the spec says)."""
    base = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "share")
    return os.path.join(base, "ollana")


# The server's side.


@dataclass(frozen=True)
class ServerCertificate:
    """A server's certificate (with the CA certificates that follow it in its file, if any)
    and its private key, already checked to belong together."""

    cert_path: str
    key_path: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    key: PrivateKey | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the certificate (DER): what announcements carry, 32 bytes."""
        return fingerprint_of(self.certificate)

    @property
    def fingerprint_hex(self) -> str:
        return fingerprint_hex(self.fingerprint)

    def listen_description(self, listen: str) -> str:
        """The ``ssl:`` endpoint description serving this certificate on the address a
        ``tcp:`` (or ``tcp6:``) description names: ``tcp:11435:interface=10.0.0.2``
        becomes ``ssl:11435:interface=10.0.0.2:certKey=...:privateKey=...``.

        Raises ValueError (a one-line reason) for any other kind of description.
        """
        parts = split_description(listen)
        kind = parts[0].lower()
        if kind not in ("tcp", "tcp6"):
            raise ValueError(f"TLS needs a tcp: endpoint to listen on, not {listen!r}")
        names = ("port", "interface", "backlog")
        options: dict[str, str] = {}
        for index, part in enumerate(parts[1:]):
            name, sep, value = part.partition("=")
            if not sep:
                if index >= len(names):
                    raise ValueError(f"too many arguments for TLS in {listen!r}")
                name, value = names[index], part
            if name not in names:
                raise ValueError(f"option {name!r} of {listen!r} is not supported with TLS")
            options[name] = value
        if "port" not in options:
            raise ValueError(f"no port in {listen!r}")
        if kind == "tcp6" and "interface" not in options:
            options["interface"] = quoteStringArgument("::")
        pieces = ["ssl", options.pop("port")]
        pieces += [f"{name}={value}" for name, value in options.items()]
        pieces.append("certKey=" + quoteStringArgument(self.cert_path))
        pieces.append("privateKey=" + quoteStringArgument(self.key_path))
        if self.chain:  # Twisted reads the leaf again, first in the file: sent twice
            pieces.append("extraCertChain=" + quoteStringArgument(self.cert_path))
        return ":".join(pieces)

    def server_options(self) -> CertificateOptions:
        """Twisted's TLS settings serving this certificate (for SSL4ServerEndpoint)."""
        if self.key is None:
            raise TLSSetupError(f"{self.key_path}: private key not loaded")
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.certificate),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain],
        )


def ensure_self_signed(data_dir: str) -> ServerCertificate:
    """The server's self-signed certificate in data_dir, made on the first run.

    The directory is created mode 0700, the key file (``tls.key``) mode 0600, never
    overwritten; ``tls.crt`` is made from the key if it is missing. Files that exist
    but cannot be used raise TLSSetupError rather than being replaced: a new certificate
    would change the fingerprint that clients know.
    """
    key_path = os.path.join(data_dir, KEY_FILE)
    cert_path = os.path.join(data_dir, CERT_FILE)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise TLSSetupError(f"{data_dir}: cannot create directory: {_os_reason(e)}") from None
    made_key = False
    if not os.path.lexists(key_path):
        new_key = ec.generate_private_key(ec.SECP256R1())
        pem = new_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_new(key_path, pem, 0o600)
            made_key = True
        except FileExistsError:
            pass  # another process made it first: use its key
        except OSError as e:
            raise TLSSetupError(f"{key_path}: cannot write key: {_os_reason(e)}") from None
    key = _load_key(key_path)
    if made_key or not os.path.lexists(cert_path):
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TLSSetupError(f"{key_path}: not an EC or RSA key, cannot make a certificate")
        pem = _self_signed(key).public_bytes(serialization.Encoding.PEM)
        try:  # written whole under another name, then renamed: never seen half-written
            _write_new(cert_path + ".new", pem, 0o644, replace=True)
            os.replace(cert_path + ".new", cert_path)
        except OSError as e:
            reason = _os_reason(e)
            raise TLSSetupError(f"{cert_path}: cannot write certificate: {reason}") from None
        server = _load(cert_path, key_path, key)
        log.info("Made a self-signed TLS certificate {path}, SHA-256 {fingerprint}",
                 path=cert_path, fingerprint=server.fingerprint_hex)  # fmt: skip
        return server
    return _load(cert_path, key_path, key)


def load_certificate(cert_path: str, key_path: str) -> ServerCertificate:
    """A certificate (PEM; CA certificates may follow it in the file) and its key (PEM,
    unencrypted), as --tls-cert and --tls-key name them; TLSSetupError if unusable."""
    return _load(cert_path, key_path, _load_key(key_path))


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _write_new(path: str, data: bytes, mode: int, replace: bool = False) -> None:
    """Write a file that must not exist yet (unless replace), created with this mode."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{path}: cannot read {what}: {_os_reason(e)}") from None


def _load_key(path: str) -> PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(f"{path}: encrypted private keys are not supported") from None
    except ValueError:
        raise TLSSetupError(f"{path}: not a valid PEM private key") from None
    except UnsupportedAlgorithm as e:
        raise TLSSetupError(f"{path}: unsupported private key ({_first_line(e)})") from None
    if not isinstance(key, PrivateKey):
        raise TLSSetupError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(f"{path}: not a valid PEM {what}") from None
    return certificates


def _load(cert_path: str, key_path: str, key: PrivateKey) -> ServerCertificate:
    leaf, *chain = _load_certificates(cert_path, "certificate")
    der, info = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(der, info) != key.public_key().public_bytes(der, info):
        raise TLSSetupError(f"{key_path}: this key does not belong to the certificate {cert_path}")
    return ServerCertificate(cert_path, key_path, leaf, tuple(chain), key)


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# The client's side.

Check = Callable[[x509.Certificate, int, int, int], CertificateRejected | None]


@implementer(IOpenSSLClientConnectionCreator)
class _CheckedTLS:
    """Client connections whose server certificate is checked by a verify callback of
    ours, for each certificate of the chain OpenSSL builds: a rejection fails the handshake
    (as Twisted's own hostname check does) with the rejection as the connection's reason.
    """

    def __init__(
        self, connect: Callable[[TLSMemoryBIOProtocol], SSL.Connection], host: str, check: Check
    ) -> None:
        self._connect = connect  # makes the connection, its TLS settings and SNI
        self._host = host
        self._check = check  # (certificate, X.509 error, depth, preverify ok) -> rejection

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._connect(tlsProtocol)
        verify = partial(self._verify, tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection

    def _verify(self, tlsProtocol: TLSMemoryBIOProtocol, connection: SSL.Connection,
                cert: crypto.X509, err: int, depth: int, ok: int) -> bool:  # fmt: skip
        try:
            rejection = self._check(cert.to_cryptography(), err, depth, ok)
            if rejection is None:
                return True
        except BaseException:  # an exception must not reach OpenSSL: it would be lost
            log.failure("While checking the certificate of {host}", host=self._host)
            rejection = CertificateRejected(f"cannot check the certificate of {self._host}")
        tlsProtocol.failVerification(Failure(rejection))
        return False


def pinned_client_tls(fingerprint: bytes, host: str) -> IOpenSSLClientConnectionCreator:
    """TLS to a server whose certificate must have this SHA-256 fingerprint, whatever else
    it says (no CA, no name, no dates: the pin is the trust); host is for messages. A
    mismatch fails the handshake with a FingerprintMismatch, before a byte of the request
    is sent.
    """
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(
            f"a SHA-256 fingerprint is {FINGERPRINT_SIZE} bytes, not {len(fingerprint)}"
        )
    expected = bytes(fingerprint)

    def mismatch(got: bytes) -> FingerprintMismatch | None:
        if hmac.compare_digest(got, expected):
            return None
        return FingerprintMismatch(host, expected, got)

    def check(cert: x509.Certificate, err: int, depth: int, ok: int) -> CertificateRejected | None:
        if depth != 0:
            return None  # the rest of the chain (if any) says nothing: the pin decides
        return mismatch(fingerprint_of(cert))

    def handshake_done(connection: SSL.Connection, where: int, ret: int) -> None:
        """Belt and braces: the handshake ended with the pinned certificate (checked before
        Twisted lets the request out)."""
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        wrong: CertificateRejected | None
        try:
            cert = connection.get_peer_certificate()
            wrong = mismatch(fingerprint_of(cert.to_cryptography()) if cert else b"")
        except BaseException:  # an exception must not reach OpenSSL: it would be lost
            log.failure("While checking the certificate of {host}", host=host)
            wrong = CertificateRejected(f"cannot check the certificate of {host}")
        if wrong is not None:
            connection.get_app_data().failVerification(Failure(wrong))

    context = CertificateOptions().getContext()  # TLS 1.2 or newer, Twisted's ciphers
    context.set_info_callback(handshake_done)

    def connect(tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(context, None)  # no SNI: the pin says which certificate
        connection.set_app_data(tlsProtocol)
        return connection

    return _CheckedTLS(connect, host, check)


def load_trust_root(ca_pem_path: str) -> list[Certificate]:
    """The CA certificates (PEM, one or more) of a --tls-ca file; TLSSetupError if unusable."""
    certificates = _load_certificates(ca_pem_path, "CA certificate")
    return [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]


def ca_client_tls(
    host: str, ca_pem_path: str, trust: list[Certificate] | None = None
) -> IOpenSSLClientConnectionCreator:
    """TLS to a server whose certificate a CA of ca_pem_path issued for host: a DNS name,
    or an IP address, which the certificate must then carry as an IP subjectAltName.
    trust: the file's certificates, if already loaded by load_trust_root."""
    if trust is None:
        trust = load_trust_root(ca_pem_path)
    return _trusted(host, trustRootFromCertificates(trust), f"the CA in {ca_pem_path}")


def system_client_tls(host: str) -> IOpenSSLClientConnectionCreator:
    """TLS to a server whose certificate a CA this system trusts issued for host."""
    return _trusted(host, platformTrust(), "the system's CAs")


def _trusted(
    host: str,
    trust_root: Any,  # Any: an IOpenSSLTrustRoot, which Twisted keeps in a private module
    source: str,
) -> _CheckedTLS:
    """optionsForClientTLS makes the connection (trust root, TLS versions, SNI); the checks
    are its own (OpenSSL's chain verification, then service_identity's at the leaf), in a
    verify callback of ours that gives a one-line reason, and that also refuses a
    certificate without subjectAltName (Twisted 26's logs the CertificateError and goes on).
    """
    options = optionsForClientTLS(host, trustRoot=trust_root)
    is_ip = isIPAddress(host) or isIPv6Address(host)

    def check(cert: x509.Certificate, err: int, depth: int, ok: int) -> CertificateRejected | None:
        if not ok:
            why = _VERIFY_ERRORS.get(err, f"X.509 error {err}")
            return CertificateRejected(f"certificate of {host} is not trusted by {source}: {why}")
        if depth != 0:
            return None
        try:
            if is_ip:
                verify_certificate_ip_address(cert, host)
            else:
                verify_certificate_hostname(cert, host)
        except (VerificationError, CertificateError):
            return CertificateRejected(f"certificate is not for {host}: it names {_names(cert)}")
        return None

    return _CheckedTLS(options.clientConnectionForTLS, host, check)


_VERIFY_ERRORS = {  # OpenSSL's X509_V_ERR_* reasons, the usual ones
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def _names(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no name or address"


Pins = Callable[[str, int], bytes | None]  # (host, port) -> the fingerprint announced there


class ClientTLS:
    """How a client checks the servers it reaches over https: against the CA of --tls-ca
    when one is given (read now, so that a bad file stops the start); else against the
    fingerprint announced for that address (``pins``, which the peer pool answers); else
    (a --peer https server, say) against the system's CAs. Creators are kept, one per
    (host, pin)."""

    def __init__(self, ca_pem_path: str | None = None, pins: Pins | None = None) -> None:
        self.ca_pem_path = ca_pem_path
        self._pins: Pins = pins or (lambda host, port: None)
        self._trust = load_trust_root(ca_pem_path) if ca_pem_path is not None else None
        self._creators: dict[tuple[str, bytes | None], IOpenSSLClientConnectionCreator] = {}

    def creator_for(self, host: str, port: int) -> IOpenSSLClientConnectionCreator:
        """The TLS connection creator for the server at host:port (an IPv6 host with or
        without its brackets), as an IAgentEndpointFactory needs it for an https URL."""
        host = host.removeprefix("[").removesuffix("]")
        return self.creator(host, None if self.ca_pem_path is not None else self._pins(host, port))

    def creator(self, host: str, fingerprint: bytes | None) -> IOpenSSLClientConnectionCreator:
        """The TLS connection creator for a server at host (a name or an address) that
        announced this fingerprint (None: none announced, or not discovered)."""
        if self.ca_pem_path is not None:
            fingerprint = None  # the CA decides
        key = (host, fingerprint)
        creator = self._creators.get(key)
        if creator is None:
            if self.ca_pem_path is not None:
                creator = ca_client_tls(host, self.ca_pem_path, self._trust)
            elif fingerprint is not None:
                creator = pinned_client_tls(fingerprint, host)
            else:
                creator = system_client_tls(host)
            if len(self._creators) >= 256:  # servers come and go: do not grow forever
                self._creators.clear()
            self._creators[key] = creator
        return creator
