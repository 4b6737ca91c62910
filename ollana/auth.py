"""A shared secret: signed discovery datagrams, and the credential of proxied requests.

Nodes given the same secret (``--secret-file PATH`` or ``$OLLANA_SECRET``, at least 16
bytes) sign every LANA datagram they send and ignore every one that is not signed with
it. A signed datagram is the packet (``wire.encode``'s bytes) followed by two fields of
the types ``wire`` reserves for authentication::

    0xC0 AUTH_STAMP  16 bytes  the sender's clock in milliseconds (signed, 64 bits),
                               then 8 random bytes
    0xC1 AUTH_TAG    32 bytes  HMAC-SHA256 of every byte before this field (magic,
                               header, fields, the stamp), keyed with a key derived
                               from the secret

The tag is the last field. A datagram is accepted when its tag is right, its timestamp
is within ``window`` seconds of the receiver's clock (either way), and the receiver has
not accepted the same datagram before: the tags of accepted datagrams are kept for as
long as their timestamp is within the window, up to a fixed number of them.

A client-mode node proves to server-mode nodes that it holds the secret with the header
``X-Ollana-Credential``: ``request_credential(secret)``, an HMAC of a fixed label. It is
the same value on every request, so anyone who can read a request on the wire can
replay it (TLS keeps it private); it does not reveal the secret, nor the key of the
discovery tags.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import struct
from collections import Counter
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.python.usage import UsageError

from ollana import wire

SECRET_ENV = "OLLANA_SECRET"
MIN_SECRET_SIZE = 16
MAX_SECRET_FILE = 64 * 1024
DEFAULT_WINDOW = 30.0  # seconds either side of this node's clock
DEFAULT_REMEMBERED = 4096  # tags of accepted datagrams kept against replays

CREDENTIAL_HEADER = b"x-ollana-credential"
CREDENTIAL_LABEL = b"ollana proxy credential v1"
DISCOVERY_LABEL = b"ollana discovery key v1"

STAMP = struct.Struct(">q8s")  # milliseconds, nonce
TAG_SIZE = hashlib.sha256().digest_size
OVERHEAD = 2 * 2 + STAMP.size + TAG_SIZE  # bytes sign() adds to a packet


def load_secret(path: str | None, environ: Mapping[str, str]) -> bytes | None:
    """The shared secret: the contents of the file at path (surrounding whitespace
    stripped) if a path is given, else $OLLANA_SECRET, else None.

    Raises UsageError with a one-line reason naming the option for an unreadable,
    empty or too short secret; no message ever contains the secret (nor the path,
    in case a secret was given where the path belongs).
    """
    if path is not None:
        return _checked(_read_secret_file(path), "--secret-file")
    value = environ.get(SECRET_ENV)
    if value is None:
        return None
    return _checked(value.encode("utf-8", "surrogateescape").strip(), SECRET_ENV)


def _read_secret_file(path: str) -> bytes:
    if not path:
        raise UsageError("--secret-file: no path given")
    try:
        with open(path, "rb") as f:
            contents = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise UsageError(f"--secret-file: cannot read the file: {e.strerror or 'error'}") from None
    if len(contents) > MAX_SECRET_FILE:
        raise UsageError("--secret-file: the file is larger than 64 KiB; it should hold a secret")
    return contents.strip()


def _checked(secret: bytes, option: str) -> bytes:
    if not secret:
        raise UsageError(f"{option}: the secret is empty")
    if len(secret) < MIN_SECRET_SIZE:
        raise UsageError(f"{option}: the secret is shorter than {MIN_SECRET_SIZE} bytes")
    return secret


def request_credential(secret: bytes) -> bytes:
    """The X-Ollana-Credential value of a node holding this secret (hex, ASCII)."""
    return hmac.new(secret, CREDENTIAL_LABEL, hashlib.sha256).hexdigest().encode("ascii")


def credential_ok(secret: bytes, value: bytes | None) -> bool:
    """Whether an X-Ollana-Credential value proves the secret (compared in constant time)."""
    if value is None:
        return False
    return hmac.compare_digest(request_credential(secret), value)


class Unauthenticated(wire.MalformedPacket):
    """A datagram that is not signed with our secret, stale, or replayed.

    ``category`` is one of "unsigned", "forged", "stale", "replayed".
    """

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category


class PacketAuth:
    """Signs discovery datagrams and verifies them (with a window and a replay cache).

    ``rejections`` counts refused datagrams by category: "malformed" and those of
    Unauthenticated. ``remembered`` is the number of tags held against replays, at most
    ``max_remembered``: when more datagrams are accepted within the window, the oldest
    tags are dropped and datagrams not newer than them are refused from then on.
    """

    def __init__(
        self,
        secret: bytes,
        clock: IReactorTime,
        window: float = DEFAULT_WINDOW,
        max_remembered: int = DEFAULT_REMEMBERED,
    ) -> None:
        if len(secret) < MIN_SECRET_SIZE:
            raise ValueError(f"the secret must be at least {MIN_SECRET_SIZE} bytes")
        if not window > 0:
            raise ValueError("the window must be positive")
        if max_remembered < 1:
            raise ValueError("max_remembered must be at least 1")
        # Only the derived key is kept: the secret itself is in no attribute.
        self._key = hmac.new(secret, DISCOVERY_LABEL, hashlib.sha256).digest()
        self._clock = clock
        self.window = window
        self.max_remembered = max_remembered
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[float, bytes]] = []  # heap of (timestamp, tag)
        self._floor = float("-inf")  # datagrams not newer than this are refused
        self.rejections: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<PacketAuth window={self.window:g}s remembered={self.remembered}>"

    @property
    def remembered(self) -> int:
        return len(self._seen)

    def sign(self, packet: bytes) -> bytes:
        """The packet with a timestamp, a nonce and the tag appended.

        Raises ValueError (MalformedPacket is one) for what is not an encoded packet, the
        bare legacy magic included, and when the result would exceed wire.MAX_PACKET.
        """
        if packet == wire.MAGIC:
            raise ValueError("the legacy hello cannot be signed")
        wire.decode(packet)
        millis = round(self._clock.seconds() * 1000)
        stamped = wire.append_field(packet, wire.AUTH_STAMP, STAMP.pack(millis, os.urandom(8)))
        return wire.append_field(stamped, wire.AUTH_TAG, self._tag(stamped))

    def verify(self, datagram: bytes) -> bytes:
        """The packet that was signed, if this datagram is authentic, fresh and new.

        Raises wire.MalformedPacket for what is not a signed LANA packet, and its
        subclass Unauthenticated for a wrong tag, a timestamp outside the window or a
        replay; nothing else, whatever the bytes. Only datagrams with a good tag are
        remembered, so forged ones cannot fill the replay cache.
        """
        try:
            return self._verify(datagram)
        except Unauthenticated as e:
            self.rejections[e.category] += 1
            raise
        except wire.MalformedPacket:
            self.rejections["malformed"] += 1
            raise

    def _verify(self, datagram: bytes) -> bytes:
        if datagram == wire.MAGIC:
            raise Unauthenticated("unsigned", "legacy hello (not signed)")
        last = wire.split_last_field(datagram)
        if last is None or last[1] != wire.AUTH_TAG:
            raise Unauthenticated("unsigned", "not signed")
        stamped, _, tag = last
        if not hmac.compare_digest(self._tag(stamped), tag):
            raise Unauthenticated("forged", "bad authentication tag")
        # The tag is right: the rest was made by a holder of the secret.
        before = wire.split_last_field(stamped)
        if before is None or before[1] != wire.AUTH_STAMP or len(before[2]) != STAMP.size:
            raise wire.MalformedPacket("signed packet without a timestamp")
        packet, _, stamp = before
        millis, _nonce = STAMP.unpack(stamp)
        sent = millis / 1000
        now = self._clock.seconds()
        if abs(sent - now) > self.window:
            raise Unauthenticated(
                "stale", f"timestamp {sent - now:+.0f} s from this clock (clocks out of sync?)"
            )
        self._forget_before(now - self.window)
        if tag in self._seen:
            raise Unauthenticated("replayed", "replayed")
        if sent <= self._floor:
            raise Unauthenticated("replayed", "older than the replay cache holds")
        self._remember(sent, tag)
        return packet

    def _tag(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def _forget_before(self, oldest: float) -> None:
        # Datagrams stamped before this are outside the window: refused without the cache.
        while self._expiry and self._expiry[0][0] < oldest:
            _, tag = heapq.heappop(self._expiry)
            self._seen.discard(tag)

    def _remember(self, sent: float, tag: bytes) -> None:
        self._seen.add(tag)
        heapq.heappush(self._expiry, (sent, tag))
        while len(self._seen) > self.max_remembered:
            dropped, tag = heapq.heappop(self._expiry)
            self._seen.discard(tag)
            self._floor = max(self._floor, dropped)
