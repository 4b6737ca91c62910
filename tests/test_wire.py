"""The LANA datagram codec."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ollana import wire
from tests.support.strategies import messages

NODE = bytes(range(16))


def header(kind: int, version: int = wire.PROTOCOL_VERSION, magic: bytes = b"LANA") -> bytes:
    return struct.pack(">4sBB16s", magic, version, kind, NODE)


def field(kind: int, value: bytes) -> bytes:
    return struct.pack(">BB", kind, len(value)) + value


GOOD_FIELDS = field(1, struct.pack(">H", 11435)) + field(2, b"http") + field(3, b"0.1.0")


class RoundTripTests(SynchronousTestCase):
    @given(messages)
    def test_round_trip(self, message: wire.Message) -> None:
        packet = wire.encode(message)
        self.assertLessEqual(len(packet), wire.MAX_PACKET)
        self.assertTrue(packet.startswith(wire.MAGIC))
        self.assertEqual(wire.decode(packet), message)

    @given(st.binary(max_size=600))
    def test_arbitrary_bytes_raise_only_malformed(self, data: bytes) -> None:
        try:
            wire.decode(data)
        except wire.MalformedPacket:
            pass

    @given(st.binary(max_size=80))
    def test_arbitrary_fields_after_a_good_header(self, data: bytes) -> None:
        for kind in (1, 2, 3, 4):
            try:
                wire.decode(header(kind) + data)
            except wire.MalformedPacket:
                pass

    @given(messages, st.data())
    def test_truncations_never_raise_anything_else(
        self, message: wire.Message, data: st.DataObject
    ) -> None:
        packet = wire.encode(message)
        cut = data.draw(st.integers(0, len(packet)))
        try:
            wire.decode(packet[:cut])
        except wire.MalformedPacket:
            pass


class LayoutTests(SynchronousTestCase):
    def test_starts_with_magic_number(self) -> None:
        packet = wire.encode(wire.Probe(NODE))
        self.assertEqual(struct.unpack(">I", packet[:4])[0], 0x4C414E41)
        self.assertEqual(packet, header(1))

    def test_announce_layout(self) -> None:
        packet = wire.encode(wire.Announce(NODE, 11435, "http", "0.1.0"))
        self.assertEqual(packet, header(2) + GOOD_FIELDS)

    def test_bare_magic_is_the_legacy_hello(self) -> None:
        self.assertEqual(wire.decode(b"LANA"), wire.LegacyHello())
        self.assertEqual(wire.encode(wire.LegacyHello()), b"LANA")

    def test_unknown_fields_are_skipped(self) -> None:
        packet = header(2) + field(0xC0, b"\x00" * 32) + GOOD_FIELDS + field(99, b"future")
        self.assertEqual(wire.decode(packet), wire.Announce(NODE, 11435, "http", "0.1.0"))

    def test_room_for_an_authentication_tag(self) -> None:
        announce = wire.Announce(NODE, 65535, "https", "v" * wire.MAX_VERSION_TEXT)
        # A SHA-256 HMAC, a timestamp, a nonce and a certificate fingerprint, as a later
        # version may append them in the reserved field types.
        extras = field(0xC0, b"t" * 32) + field(0xC1, b"s" * 8) + field(0xC2, b"n" * 16)
        extras += field(0xC3, b"f" * 32)
        packet = wire.encode(announce) + extras
        self.assertLessEqual(len(packet), wire.MAX_PACKET)
        self.assertEqual(wire.decode(packet), announce)


class FingerprintTests(SynchronousTestCase):
    def test_layout(self) -> None:
        announce = wire.Announce(NODE, 11435, "https", "0.1.0", b"\xab" * 32)
        packet = wire.encode(announce)
        self.assertEqual(
            packet,
            header(2)
            + field(1, struct.pack(">H", 11435))
            + field(2, b"https")
            + field(3, b"0.1.0")
            + field(4, b"\xab" * 32),
        )
        self.assertEqual(wire.decode(packet), announce)

    def test_optional(self) -> None:
        self.assertIsNone(wire.decode(header(2) + GOOD_FIELDS).fingerprint)  # type: ignore[union-attr]

    def test_any_order(self) -> None:
        packet = header(2) + field(4, b"f" * 32) + GOOD_FIELDS
        announce = wire.Announce(NODE, 11435, "http", "0.1.0", b"f" * 32)
        self.assertEqual(wire.decode(packet), announce)

    def test_wrong_size(self) -> None:
        for size in (0, 31, 33):
            e = self.assertRaises(
                wire.MalformedPacket, wire.decode, header(2) + GOOD_FIELDS + field(4, b"f" * size)
            )
            self.assertEqual(str(e), "bad fingerprint field")
            self.assertRaises(
                ValueError, wire.encode, wire.Announce(NODE, 1, "http", "1", b"f" * size)
            )

    def test_ignored_in_other_messages(self) -> None:
        self.assertEqual(wire.decode(header(1) + field(4, b"x")), wire.Probe(NODE))


class FieldSplittingTests(SynchronousTestCase):
    @given(messages.filter(lambda m: not isinstance(m, wire.LegacyHello)), st.data())
    def test_append_then_split(self, message: wire.Message, data: st.DataObject) -> None:
        packet = wire.encode(message)
        kind = data.draw(st.integers(5, 255))
        value = data.draw(st.binary(max_size=min(255, wire.MAX_PACKET - len(packet) - 2)))
        longer = wire.append_field(packet, kind, value)
        self.assertEqual(longer, packet + bytes([kind, len(value)]) + value)
        self.assertEqual(wire.split_last_field(longer), (packet, kind, value))

    def test_split_a_packet_without_fields(self) -> None:
        self.assertIsNone(wire.split_last_field(header(1)))
        self.assertEqual(
            wire.split_last_field(header(2) + GOOD_FIELDS),
            (header(2) + GOOD_FIELDS[:-7], 3, b"0.1.0"),
        )

    def test_split_rejects_what_decode_rejects_for_its_layout(self) -> None:
        for packet in (
            b"LANA",
            b"",
            header(1, magic=b"LAMA"),
            header(1, version=2),
            header(1) + b"\x01",
            header(1) + b"\x01\x05ab",
            header(1) + field(7, b"") + field(7, b""),
            header(1) + field(99, b"x" * 200) * 3,
        ):
            self.assertRaises(wire.MalformedPacket, wire.split_last_field, packet)

    @given(st.binary(max_size=600))
    def test_split_arbitrary_bytes_raises_only_malformed(self, data: bytes) -> None:
        try:
            wire.split_last_field(header(2) + data)
            wire.split_last_field(data)
        except wire.MalformedPacket:
            pass

    def test_append_refuses(self) -> None:
        self.assertRaises(ValueError, wire.append_field, b"LANA", 0xC0, b"")
        self.assertRaises(ValueError, wire.append_field, header(1), 256, b"")
        self.assertRaises(ValueError, wire.append_field, header(1), -1, b"")
        self.assertRaises(ValueError, wire.append_field, header(1) + field(0xC0, b""), 0xC0, b"")
        self.assertRaises(ValueError, wire.append_field, header(1) + b"\x01", 0xC0, b"")
        self.assertRaises(ValueError, wire.append_field, header(1), 0xC0, b"x" * 256)
        big = header(1) + field(99, b"x" * 255) + field(98, b"x" * 200)
        self.assertRaises(ValueError, wire.append_field, big, 0xC0, b"x" * 40)


class RejectionTests(SynchronousTestCase):
    def assertRejected(self, packet: bytes, reason: str) -> None:
        e = self.assertRaises(wire.MalformedPacket, wire.decode, packet)
        self.assertIn(reason, str(e))

    def test_short(self) -> None:
        self.assertRejected(b"LAN", "too short")
        self.assertRejected(b"LANA\x01", "too short")

    def test_bad_magic(self) -> None:
        self.assertRejected(header(1, magic=b"LAMA"), "bad magic")

    def test_future_version(self) -> None:
        self.assertRejected(header(1, version=2), "unsupported protocol version 2")

    def test_unknown_kind(self) -> None:
        self.assertRejected(header(9), "unknown message kind 9")

    def test_too_large(self) -> None:
        self.assertRejected(header(1) + field(99, b"x" * 200) * 3, "too large")

    def test_truncated_field(self) -> None:
        self.assertRejected(header(1) + b"\x01", "truncated field header")
        self.assertRejected(header(1) + b"\x01\x05ab", "truncated field value")

    def test_repeated_field(self) -> None:
        self.assertRejected(header(2) + GOOD_FIELDS + field(1, b"\x00\x01"), "repeated field 1")

    def test_announce_fields(self) -> None:
        self.assertRejected(header(2) + field(2, b"http") + field(3, b"1"), "lacks field 1")
        self.assertRejected(
            header(2) + field(1, b"\x01") + field(2, b"http") + field(3, b"1"), "bad port field"
        )
        self.assertRejected(
            header(2) + field(1, b"\x00\x00") + field(2, b"http") + field(3, b"1"), "port 0"
        )
        self.assertRejected(
            header(2) + field(1, b"\x00\x01") + field(2, b"gopher") + field(3, b"1"),
            "unknown scheme",
        )
        self.assertRejected(
            header(2) + field(1, b"\x00\x01") + field(2, b"http") + field(3, b"\xff"), "UTF-8"
        )
        self.assertRejected(
            header(2) + field(1, b"\x00\x01") + field(2, b"http") + field(3, b"a\nb"),
            "printable",
        )

    def test_encode_refuses_what_cannot_be_decoded(self) -> None:
        self.assertRaises(ValueError, wire.encode, wire.Probe(b"short"))
        self.assertRaises(ValueError, wire.encode, wire.Announce(NODE, 0, "http", "1"))
        self.assertRaises(ValueError, wire.encode, wire.Announce(NODE, 1, "ftp", "1"))
        self.assertRaises(ValueError, wire.encode, wire.Announce(NODE, 1, "http", "x" * 65))
        self.assertRaises(ValueError, wire.encode, wire.Announce(NODE, 1, "http", "a\tb"))
