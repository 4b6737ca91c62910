"""The LANA discovery datagram: a pure codec, no I/O and no Twisted.

Layout (network byte order)::

    magic    4 bytes  b"LANA" (0x4C414E41, as in the original Ollana)
    version  1 byte   PROTOCOL_VERSION
    kind     1 byte   Kind
    node id 16 bytes  the sender's random id
    fields   rest     type (1 byte), length (1 byte), value; unknown types are skipped

An ANNOUNCE carries PORT, SCHEME and VERSION fields, and FINGERPRINT (the SHA-256 of
the server's TLS certificate) when the server has one. Field types from 0xC0 up are
reserved for authentication (ollana.auth appends AUTH_STAMP and, last, AUTH_TAG; decode
skips them like any unknown field). A datagram is at most MAX_PACKET bytes. The original
Ollana's probe and reply are the bare 4-byte magic: that decodes as LegacyHello.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = b"LANA"
PROTOCOL_VERSION = 1
MAX_PACKET = 512
NODE_ID_SIZE = 16
MAX_VERSION_TEXT = 64
SCHEMES = ("http", "https")
FINGERPRINT_SIZE = 32
AUTH_STAMP = 0xC0  # reserved for ollana.auth: timestamp and nonce
AUTH_TAG = 0xC1  # reserved for ollana.auth: the HMAC of everything before it
MAX_FIELD_VALUE = 255

_HEADER = struct.Struct(">4sBB16s")
_FIELD = struct.Struct(">BB")
_PORT = struct.Struct(">H")


class Kind(enum.IntEnum):
    PROBE = 1
    ANNOUNCE = 2
    BYE = 3


class Field(enum.IntEnum):
    PORT = 1
    SCHEME = 2
    VERSION = 3
    FINGERPRINT = 4


class MalformedPacket(ValueError):
    """The datagram is not a LANA packet this codec understands."""


@dataclass(frozen=True)
class Probe:
    """Who is there? Sent by clients, answered by servers with an Announce."""

    node_id: bytes


@dataclass(frozen=True)
class Announce:
    """A server's proxy is reachable at the sender's address on this port and scheme."""

    node_id: bytes
    port: int
    scheme: str
    version: str
    fingerprint: bytes | None = None  # SHA-256 of the server's TLS certificate


@dataclass(frozen=True)
class Bye:
    """The sender's proxy is going away."""

    node_id: bytes


@dataclass(frozen=True)
class LegacyHello:
    """The original Ollana's bare magic: a probe to a server, a reply to a client."""


Message = Probe | Announce | Bye | LegacyHello


def encode(message: Message) -> bytes:
    """Serialize a message; raises ValueError for values that cannot be sent."""
    if isinstance(message, LegacyHello):
        return MAGIC
    if len(message.node_id) != NODE_ID_SIZE:
        raise ValueError(f"node id must be {NODE_ID_SIZE} bytes")
    if isinstance(message, Probe):
        kind, fields = Kind.PROBE, b""
    elif isinstance(message, Bye):
        kind, fields = Kind.BYE, b""
    else:
        kind, fields = Kind.ANNOUNCE, _announce_fields(message)
    packet = _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, message.node_id) + fields
    assert len(packet) <= MAX_PACKET
    return packet


def _announce_fields(message: Announce) -> bytes:
    if not 1 <= message.port <= 65535:
        raise ValueError(f"port out of range: {message.port}")
    if message.scheme not in SCHEMES:
        raise ValueError(f"unknown scheme: {message.scheme!r}")
    version = message.version.encode("utf-8")
    if len(version) > MAX_VERSION_TEXT or not message.version.isprintable():
        raise ValueError("version text must be printable and at most 64 bytes")
    fields = (
        _field(Field.PORT, _PORT.pack(message.port))
        + _field(Field.SCHEME, message.scheme.encode("ascii"))
        + _field(Field.VERSION, version)
    )
    if message.fingerprint is not None:
        if len(message.fingerprint) != FINGERPRINT_SIZE:
            raise ValueError(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
        fields += _field(Field.FINGERPRINT, message.fingerprint)
    return fields


def _field(kind: int, value: bytes) -> bytes:
    return _FIELD.pack(kind, len(value)) + value


def append_field(packet: bytes, kind: int, value: bytes) -> bytes:
    """The encoded (non-legacy) packet with one more field at its end.

    Raises ValueError (MalformedPacket for a packet that split_last_field refuses) when
    the packet already has a field of that type, the type or value cannot be encoded, or
    the result would exceed MAX_PACKET.
    """
    if not 0 <= kind <= 255:
        raise ValueError(f"field type out of range: {kind}")
    _check_header(packet)
    if kind in _parse_fields(packet[_HEADER.size :]):
        raise ValueError(f"packet already has a field {kind}")
    if len(value) > MAX_FIELD_VALUE:
        raise ValueError(f"field value longer than {MAX_FIELD_VALUE} bytes")
    packet += _field(kind, value)
    if len(packet) > MAX_PACKET:
        raise ValueError(f"packet would exceed {MAX_PACKET} bytes")
    return packet


def split_last_field(packet: bytes) -> tuple[bytes, int, bytes] | None:
    """(everything before the last field, its type, its value) of a well-formed packet;
    None for a header without fields.

    Checks the header (magic, protocol version, size) and the layout of every field, but
    not the message kind or the fields' values. Raises MalformedPacket, and nothing else,
    for any bad input; the bare legacy magic is malformed here.
    """
    _check_header(packet)
    offset = _HEADER.size
    last = -1
    seen: set[int] = set()
    while offset < len(packet):
        if offset + _FIELD.size > len(packet):
            raise MalformedPacket("truncated field header")
        kind, length = _FIELD.unpack_from(packet, offset)
        if offset + _FIELD.size + length > len(packet):
            raise MalformedPacket("truncated field value")
        if kind in seen:
            raise MalformedPacket(f"repeated field {kind}")
        seen.add(kind)
        last = offset
        offset += _FIELD.size + length
    if last < 0:
        return None
    return packet[:last], packet[last], packet[last + _FIELD.size :]


def _check_header(packet: bytes) -> tuple[int, bytes]:
    """The kind and node id of a packet whose header is sound; else MalformedPacket."""
    if len(packet) > MAX_PACKET:
        raise MalformedPacket("datagram too large")
    if len(packet) < _HEADER.size:
        raise MalformedPacket("datagram too short")
    magic, version, kind, node_id = _HEADER.unpack_from(packet)
    if magic != MAGIC:
        raise MalformedPacket("bad magic")
    if version != PROTOCOL_VERSION:
        raise MalformedPacket(f"unsupported protocol version {version}")
    return kind, node_id


def decode(packet: bytes) -> Message:
    """Parse a datagram; raises MalformedPacket, and nothing else, for any bad input."""
    if packet == MAGIC:
        return LegacyHello()
    kind, node_id = _check_header(packet)
    fields = _parse_fields(packet[_HEADER.size :])
    if kind == Kind.PROBE:
        return Probe(node_id)
    if kind == Kind.BYE:
        return Bye(node_id)
    if kind == Kind.ANNOUNCE:
        return _parse_announce(node_id, fields)
    raise MalformedPacket(f"unknown message kind {kind}")


def _parse_fields(data: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + _FIELD.size > len(data):
            raise MalformedPacket("truncated field header")
        kind, length = _FIELD.unpack_from(data, offset)
        offset += _FIELD.size
        if offset + length > len(data):
            raise MalformedPacket("truncated field value")
        if kind in fields:
            raise MalformedPacket(f"repeated field {kind}")
        fields[kind] = data[offset : offset + length]
        offset += length
    return fields


def _parse_announce(node_id: bytes, fields: dict[int, bytes]) -> Announce:
    try:
        port_bytes = fields[Field.PORT]
        scheme_bytes = fields[Field.SCHEME]
        version_bytes = fields[Field.VERSION]
    except KeyError as e:
        raise MalformedPacket(f"announce lacks field {e.args[0]}") from None
    if len(port_bytes) != _PORT.size:
        raise MalformedPacket("bad port field")
    (port,) = _PORT.unpack(port_bytes)
    if port == 0:
        raise MalformedPacket("port 0")
    scheme = scheme_bytes.decode("ascii", "replace")
    if scheme not in SCHEMES:
        raise MalformedPacket("unknown scheme")
    if len(version_bytes) > MAX_VERSION_TEXT:
        raise MalformedPacket("version text too long")
    try:
        version = version_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("version text is not UTF-8") from None
    if not version.isprintable():
        raise MalformedPacket("version text is not printable")
    fingerprint = fields.get(Field.FINGERPRINT)
    if fingerprint is not None and len(fingerprint) != FINGERPRINT_SIZE:
        raise MalformedPacket("bad fingerprint field")
    return Announce(node_id, port, scheme, version, fingerprint)
