"""The shared secret: loading it, signed datagrams (window, replays, tampering), credentials."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ollana import auth, wire
from tests.support.strategies import announces, node_ids

SECRET = b"correct horse battery staple"
OTHER_SECRET = b"incorrect donkey battery staple"
NODE = bytes(range(16))
START = 1_700_000_000.0  # a wall clock, as the reactor's is

signable = st.one_of(st.builds(wire.Probe, node_ids), st.builds(wire.Bye, node_ids), announces)


def clock_at(when: float = START) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def probe() -> bytes:
    return wire.encode(wire.Probe(NODE))


class LoadSecretTests(SynchronousTestCase):
    def write(self, contents: bytes, name: str = "secret") -> str:
        path = FilePath(self.mktemp())
        path.makedirs()
        secret = path.child(name)
        secret.setContent(contents)
        return secret.path

    def assertUsage(self, path: str | None, environ: dict[str, str], expected: str) -> None:
        e = self.assertRaises(UsageError, auth.load_secret, path, environ)
        message = str(e)
        self.assertEqual(message, expected)
        self.assertNotIn("\n", message)
        for value in environ.values():
            if value.strip():
                self.assertNotIn(value.strip(), message)
        if path:
            self.assertNotIn(path, message)

    def test_neither_given(self) -> None:
        self.assertIsNone(auth.load_secret(None, {}))
        self.assertIsNone(auth.load_secret(None, {"OLLAMA_HOST": "x"}))

    def test_file_contents_stripped(self) -> None:
        path = self.write(b"  \n" + SECRET + b"\r\n\n")
        self.assertEqual(auth.load_secret(path, {}), SECRET)

    def test_file_wins_over_the_environment(self) -> None:
        path = self.write(SECRET)
        self.assertEqual(auth.load_secret(path, {"OLLANA_SECRET": "x" * 40}), SECRET)

    def test_environment(self) -> None:
        self.assertEqual(
            auth.load_secret(None, {"OLLANA_SECRET": " é" + "s" * 20 + "\n"}),
            ("é" + "s" * 20).encode(),
        )

    def test_binary_file(self) -> None:
        path = self.write(bytes(range(1, 255)))
        self.assertEqual(auth.load_secret(path, {}), bytes(range(1, 255)).strip())

    def test_missing_file(self) -> None:
        self.assertUsage(
            os.path.join(self.mktemp(), "nowhere"),
            {},
            "--secret-file: cannot read the file: No such file or directory",
        )

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        self.assertUsage(path, {}, "--secret-file: cannot read the file: Is a directory")

    def test_unreadable_file(self) -> None:
        if os.geteuid() == 0:
            raise SkipTest("root reads any file")
        path = self.write(SECRET)
        os.chmod(path, 0)
        self.assertUsage(path, {}, "--secret-file: cannot read the file: Permission denied")

    def test_empty_path(self) -> None:
        self.assertUsage("", {}, "--secret-file: no path given")

    def test_empty_file(self) -> None:
        for contents in (b"", b" \n\t\r\n"):
            self.assertUsage(self.write(contents), {}, "--secret-file: the secret is empty")

    def test_short_file(self) -> None:
        path = self.write(b"fifteen bytes!!\n")
        self.assertUsage(path, {}, "--secret-file: the secret is shorter than 16 bytes")
        self.assertEqual(auth.load_secret(self.write(b"sixteen bytes!!!"), {}), b"sixteen bytes!!!")

    def test_huge_file(self) -> None:
        path = self.write(b"x" * (64 * 1024 + 1))
        self.assertUsage(
            path, {}, "--secret-file: the file is larger than 64 KiB; it should hold a secret"
        )

    def test_secret_given_as_the_path_is_not_echoed(self) -> None:
        self.assertUsage(
            "hunter2-hunter2-hunter2",
            {},
            "--secret-file: cannot read the file: No such file or directory",
        )

    def test_empty_environment_variable(self) -> None:
        for value in ("", "   \n"):
            self.assertUsage(None, {"OLLANA_SECRET": value}, "OLLANA_SECRET: the secret is empty")

    def test_short_environment_variable(self) -> None:
        self.assertUsage(
            None,
            {"OLLANA_SECRET": "tiny-secret"},
            "OLLANA_SECRET: the secret is shorter than 16 bytes",
        )

    def test_a_bad_file_is_an_error_even_with_the_environment_set(self) -> None:
        self.assertUsage(
            self.write(b""),
            {"OLLANA_SECRET": "a perfectly long environment secret"},
            "--secret-file: the secret is empty",
        )


class CredentialTests(SynchronousTestCase):
    def test_header_name(self) -> None:
        self.assertEqual(auth.CREDENTIAL_HEADER, b"x-ollana-credential")

    def test_hmac_of_a_fixed_label_in_hex(self) -> None:
        value = auth.request_credential(SECRET)
        expected = hmac.new(SECRET, b"ollana proxy credential v1", hashlib.sha256).hexdigest()
        self.assertEqual(value, expected.encode("ascii"))
        self.assertEqual(len(value), 64)
        self.assertNotIn(SECRET, value)
        self.assertNotEqual(value, auth.request_credential(OTHER_SECRET))

    def test_credential_ok(self) -> None:
        value = auth.request_credential(SECRET)
        self.assertTrue(auth.credential_ok(SECRET, value))
        self.assertFalse(auth.credential_ok(OTHER_SECRET, value))
        self.assertFalse(auth.credential_ok(SECRET, None))
        self.assertFalse(auth.credential_ok(SECRET, b""))
        self.assertFalse(auth.credential_ok(SECRET, value[:-1]))
        self.assertFalse(auth.credential_ok(SECRET, value + b"0"))
        self.assertFalse(auth.credential_ok(SECRET, SECRET))

    def test_not_the_discovery_key(self) -> None:
        # Whoever reads a credential off the wire cannot sign datagrams with it.
        credential = bytes.fromhex(auth.request_credential(SECRET).decode())
        stolen = auth.PacketAuth(credential, clock_at())
        signed = stolen.sign(probe())
        receiver = auth.PacketAuth(SECRET, clock_at())
        e = self.assertRaises(auth.Unauthenticated, receiver.verify, signed)
        self.assertEqual(e.category, "forged")


class SignTests(SynchronousTestCase):
    @settings(max_examples=200)
    @given(signable)
    def test_round_trip(self, message: wire.Message) -> None:
        packet = wire.encode(message)
        signed = auth.PacketAuth(SECRET, clock_at()).sign(packet)
        self.assertLessEqual(len(signed), wire.MAX_PACKET)
        self.assertEqual(len(signed), len(packet) + auth.OVERHEAD)
        self.assertEqual(auth.PacketAuth(SECRET, clock_at()).verify(signed), packet)
        # A node without the secret reads it as the plain message.
        self.assertEqual(wire.decode(signed), message)

    def test_layout(self) -> None:
        signed = auth.PacketAuth(SECRET, clock_at(START + 0.0125)).sign(probe())
        stamped, tag_field, tag = signed[:-34], signed[-34:-32], signed[-32:]
        self.assertEqual(stamped[: len(probe())], probe())
        stamp_field, stamp = stamped[len(probe()) : -16], stamped[-16:]
        self.assertEqual(stamp_field, b"\xc0\x10")
        self.assertEqual(tag_field, b"\xc1\x20")
        millis, nonce = struct.unpack(">q8s", stamp)
        self.assertEqual(millis, round((START + 0.0125) * 1000))
        key = hmac.new(SECRET, b"ollana discovery key v1", hashlib.sha256).digest()
        self.assertEqual(tag, hmac.new(key, stamped, hashlib.sha256).digest())

    def test_nonces_differ(self) -> None:
        signer = auth.PacketAuth(SECRET, clock_at())
        self.assertNotEqual(signer.sign(probe()), signer.sign(probe()))

    def test_largest_announce_fits(self) -> None:
        announce = wire.Announce(NODE, 65535, "https", "v" * wire.MAX_VERSION_TEXT, b"f" * 32)
        signed = auth.PacketAuth(SECRET, clock_at()).sign(wire.encode(announce))
        self.assertLessEqual(len(signed), wire.MAX_PACKET)

    def test_refuses_what_it_cannot_sign(self) -> None:
        signer = auth.PacketAuth(SECRET, clock_at())
        self.assertRaises(ValueError, signer.sign, b"LANA")
        self.assertRaises(ValueError, signer.sign, b"LANA\x01")
        self.assertRaises(ValueError, signer.sign, b"GET / HTTP/1.1")
        padding = b"\x70\xc8" + b"p" * 200 + b"\x71\xfa" + b"q" * 250
        self.assertRaises(ValueError, signer.sign, probe() + padding)

    def test_refuses_bad_settings(self) -> None:
        self.assertRaises(ValueError, auth.PacketAuth, b"short", Clock())
        self.assertRaises(ValueError, auth.PacketAuth, SECRET, Clock(), window=0)
        self.assertRaises(ValueError, auth.PacketAuth, SECRET, Clock(), max_remembered=0)

    def test_secret_kept_nowhere_visible(self) -> None:
        signer = auth.PacketAuth(SECRET, clock_at())
        self.assertNotIn(SECRET, repr(signer).encode())
        self.assertNotIn(SECRET, repr(vars(signer)).encode())


class TamperingTests(SynchronousTestCase):
    def assertRefused(self, receiver: auth.PacketAuth, datagram: bytes) -> wire.MalformedPacket:
        return self.assertRaises(wire.MalformedPacket, receiver.verify, datagram)

    @settings(max_examples=300)
    @given(signable, st.data())
    def test_any_bit_flip_fails(self, message: wire.Message, data: st.DataObject) -> None:
        signed = auth.PacketAuth(SECRET, clock_at()).sign(wire.encode(message))
        bit = data.draw(st.integers(0, len(signed) * 8 - 1))
        flipped = bytearray(signed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        receiver = auth.PacketAuth(SECRET, clock_at())
        self.assertRefused(receiver, bytes(flipped))
        self.assertEqual(receiver.remembered, 0)
        self.assertEqual(receiver.verify(signed), wire.encode(message))

    @settings(max_examples=300)
    @given(signable, st.data())
    def test_any_truncation_fails(self, message: wire.Message, data: st.DataObject) -> None:
        signed = auth.PacketAuth(SECRET, clock_at()).sign(wire.encode(message))
        cut = data.draw(st.integers(0, len(signed) - 1))
        self.assertRefused(auth.PacketAuth(SECRET, clock_at()), signed[:cut])

    @given(signable, st.binary(min_size=1, max_size=40))
    def test_anything_appended_fails(self, message: wire.Message, extra: bytes) -> None:
        signed = auth.PacketAuth(SECRET, clock_at()).sign(wire.encode(message))
        self.assertRefused(auth.PacketAuth(SECRET, clock_at()), signed + extra)

    @settings(max_examples=500)
    @given(st.binary(max_size=600))
    def test_random_bytes_never_verify(self, data: bytes) -> None:
        receiver = auth.PacketAuth(SECRET, clock_at())
        self.assertRefused(receiver, data)
        self.assertEqual(receiver.remembered, 0)

    @settings(max_examples=300)
    @given(
        st.integers(0, 255),
        st.dictionaries(st.integers(0, 0xBF), st.binary(max_size=20), max_size=5),
        st.binary(min_size=32, max_size=32),
    )
    def test_well_formed_with_a_made_up_tag_never_verifies(
        self, kind: int, fields: dict[int, bytes], tag: bytes
    ) -> None:
        packet = struct.pack(">4sBB16s", b"LANA", 1, kind, NODE)
        packet += b"".join(bytes([t, len(v)]) + v for t, v in fields.items())
        packet += b"\xc0\x10" + struct.pack(">q8s", int(START * 1000), b"n" * 8)
        receiver = auth.PacketAuth(SECRET, clock_at())
        e = self.assertRaises(auth.Unauthenticated, receiver.verify, packet + b"\xc1\x20" + tag)
        self.assertEqual(e.category, "forged")

    def test_wrong_secret(self) -> None:
        signed = auth.PacketAuth(OTHER_SECRET, clock_at()).sign(probe())
        receiver = auth.PacketAuth(SECRET, clock_at())
        e = self.assertRaises(auth.Unauthenticated, receiver.verify, signed)
        self.assertEqual((e.category, str(e)), ("forged", "bad authentication tag"))
        self.assertEqual(receiver.rejections, {"forged": 1})

    def test_unsigned_and_legacy(self) -> None:
        receiver = auth.PacketAuth(SECRET, clock_at())
        for datagram in (b"LANA", probe(), wire.encode(wire.Announce(NODE, 1, "http", "1"))):
            e = self.assertRaises(auth.Unauthenticated, receiver.verify, datagram)
            self.assertEqual(e.category, "unsigned")
        self.assertRefused(receiver, b"")
        self.assertEqual(receiver.rejections, {"unsigned": 3, "malformed": 1})

    def test_signed_without_a_stamp(self) -> None:
        # Only a holder of the secret could make these: a bug, refused all the same.
        key = hmac.new(SECRET, b"ollana discovery key v1", hashlib.sha256).digest()
        for body in (probe()[:22], probe() + b"\xc0\x02ab"):
            datagram = body + b"\xc1\x20" + hmac.new(key, body, hashlib.sha256).digest()
            e = self.assertRefused(auth.PacketAuth(SECRET, clock_at()), datagram)
            self.assertIn("without a timestamp", str(e))


class FreshnessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sender_clock = clock_at()
        self.sender = auth.PacketAuth(SECRET, self.sender_clock)
        self.clock = clock_at()
        self.receiver = auth.PacketAuth(SECRET, self.clock)

    def assertCategory(self, datagram: bytes, category: str) -> None:
        e = self.assertRaises(auth.Unauthenticated, self.receiver.verify, datagram)
        self.assertEqual(e.category, category)

    def test_within_the_window(self) -> None:
        signed = self.sender.sign(probe())
        self.clock.advance(30)
        self.assertEqual(self.receiver.verify(signed), probe())

    def test_too_old(self) -> None:
        signed = self.sender.sign(probe())
        self.clock.advance(30.01)
        self.assertCategory(signed, "stale")

    def test_too_new(self) -> None:
        self.sender_clock.advance(30.01)
        self.assertCategory(self.sender.sign(probe()), "stale")
        self.sender_clock.advance(-0.02)
        self.assertEqual(self.receiver.verify(self.sender.sign(probe())), probe())

    def test_other_window(self) -> None:
        self.receiver = auth.PacketAuth(SECRET, self.clock, window=5)
        signed = self.sender.sign(probe())
        self.clock.advance(5.5)
        self.assertCategory(signed, "stale")

    def test_replay(self) -> None:
        signed = self.sender.sign(probe())
        self.assertEqual(self.receiver.verify(signed), probe())
        self.clock.advance(10)
        self.assertCategory(signed, "replayed")
        self.clock.advance(21)
        self.assertCategory(signed, "stale")
        self.assertEqual(self.receiver.rejections, {"replayed": 1, "stale": 1})

    def test_replay_cache_forgets_what_the_window_refuses(self) -> None:
        for _ in range(10):
            self.receiver.verify(self.sender.sign(probe()))
        self.assertEqual(self.receiver.remembered, 10)
        self.clock.advance(31)
        self.sender_clock.advance(31)
        self.receiver.verify(self.sender.sign(probe()))
        self.assertEqual(self.receiver.remembered, 1)

    def test_replay_cache_is_bounded(self) -> None:
        self.receiver = auth.PacketAuth(SECRET, self.clock, max_remembered=50)
        accepted = []
        for _ in range(500):
            self.sender_clock.advance(0.01)
            self.clock.advance(0.01)
            signed = self.sender.sign(probe())
            self.receiver.verify(signed)
            accepted.append(signed)
            self.assertLessEqual(self.receiver.remembered, 50)
        self.assertEqual(self.receiver.remembered, 50)
        # Forgotten or not, none of them is accepted again.
        for signed in accepted:
            self.assertCategory(signed, "replayed")
        # Fresh ones still are.
        self.sender_clock.advance(0.01)
        self.assertEqual(self.receiver.verify(self.sender.sign(probe())), probe())

    def test_forgeries_take_no_room(self) -> None:
        forger = auth.PacketAuth(OTHER_SECRET, self.sender_clock)
        for _ in range(100):
            self.assertCategory(forger.sign(probe()), "forged")
        self.assertEqual(self.receiver.remembered, 0)
