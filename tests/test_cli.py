"""The ollana command: ollana discover on a fake network."""

from __future__ import annotations

import errno
import io
import json

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from ollana import wire
from ollana.cli import DiscoverOptions, discover, main
from tests.support import FakeNetworkReactor

A = bytes.fromhex("aa" * 16)
B = bytes.fromhex("bb" * 16)


class DiscoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeNetworkReactor()
        self.out = io.StringIO()

    def run_discover(self, *args: str, answer: bool = True) -> tuple[int, str]:
        options = DiscoverOptions()
        options.parseOptions(["--broadcast", "127.255.255.255", "--discovery-port", "12000", *args])
        d = defer.Deferred.fromCoroutine(discover(self.reactor, options, self.out))
        [port] = self.reactor.udp_ports
        self.assertTrue(port.broadcast_allowed)
        [(probe, target)] = port.take()
        self.assertIsInstance(wire.decode(probe), wire.Probe)
        self.assertEqual(target, ("127.255.255.255", 12000))
        if answer:
            reply = wire.Announce(A, 11435, "http", "0.1.0")
            port.protocol.datagramReceived(wire.encode(reply), ("198.18.0.2", 12000))
            self.reactor.advance(0.5)
            self.assertEqual(len(port.take()), 1, "probes again while waiting")
            port.protocol.datagramReceived(
                wire.encode(wire.Announce(B, 8443, "https", "0.2.0")), ("198.18.0.10", 12000)
            )
            port.protocol.datagramReceived(b"LANA", ("198.18.0.3", 12000))
            port.protocol.datagramReceived(wire.encode(reply), ("198.18.0.2", 12000))
        else:
            self.reactor.advance(0.5)
        self.reactor.advance(1.4)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        code = self.successResultOf(d)
        self.assertFalse(port.listening)
        return code, self.out.getvalue()

    def test_table(self) -> None:
        code, text = self.run_discover()
        self.assertEqual(code, 0)
        self.assertEqual(
            text.splitlines(),
            [
                "ADDRESS      PORT   SCHEME  NODE                              VERSION",
                "198.18.0.10  8443   https   " + B.hex() + "  0.2.0",
                "198.18.0.2   11435  http    " + A.hex() + "  0.1.0",
                "198.18.0.3   11435  http    -                                 legacy Ollana",
            ],
        )

    def test_json(self) -> None:
        code, text = self.run_discover("--json")
        self.assertEqual(code, 0)
        self.assertEqual(
            json.loads(text),
            [
                {
                    "address": "198.18.0.10",
                    "port": 8443,
                    "scheme": "https",
                    "node_id": B.hex(),
                    "version": "0.2.0",
                    "legacy": False,
                },
                {
                    "address": "198.18.0.2",
                    "port": 11435,
                    "scheme": "http",
                    "node_id": A.hex(),
                    "version": "0.1.0",
                    "legacy": False,
                },
                {
                    "address": "198.18.0.3",
                    "port": 11435,
                    "scheme": "http",
                    "node_id": None,
                    "version": None,
                    "legacy": True,
                },
            ],
        )

    def test_nothing_found_exits_1(self) -> None:
        code, text = self.run_discover(answer=False)
        self.assertEqual((code, text), (1, "No Ollana server answered within 2 s.\n"))

    def test_nothing_found_json_is_an_empty_list(self) -> None:
        code, text = self.run_discover("--json", answer=False)
        self.assertEqual((code, json.loads(text)), (1, []))


class SendFailureTests(SynchronousTestCase):
    def test_says_when_no_probe_could_be_sent(self) -> None:
        reactor = FakeNetworkReactor()
        reactor.udp_write_error = OSError(errno.ENETUNREACH, "Network is unreachable")
        options = DiscoverOptions()
        options.parseOptions(["--broadcast", "255.255.255.255", "--discovery-port", "12000"])
        out, err = io.StringIO(), io.StringIO()
        d = defer.Deferred.fromCoroutine(discover(reactor, options, out, err))
        reactor.advance(2)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(
            err.getvalue(),
            "ollana: could not send any probe "
            "(last error: 255.255.255.255:12000: Network is unreachable)\n",
        )
        self.assertEqual(out.getvalue(), "No Ollana server answered within 2 s.\n")


class UsageTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str]:
        import sys

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, main, list(argv))
        return e.code, err.getvalue()

    def test_bad_timeout(self) -> None:
        code, err = self.run_main("discover", "--timeout", "soon")
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines()[-1], "ollana: --timeout: not a number of seconds: 'soon'")

    def test_no_command(self) -> None:
        code, err = self.run_main()
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines()[-1], "ollana: give a command: discover")

    def test_unknown_command(self) -> None:
        code, err = self.run_main("conquer")
        self.assertEqual(code, 2)
        self.assertIn("conquer", err.splitlines()[-1])
