"""ollana.config's reading of listening endpoint descriptions (parse_endpoint), and the
--listen check built on it: what it accepts, and a one-line reason for what it refuses.
(The other option parsers are tested through twistd's options, in test_tap.)"""

from __future__ import annotations

import os

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from ollana.config import ListenEndpoint, check_endpoint, parse_endpoint


class ParseEndpointTests(SynchronousTestCase):
    def test_kinds_and_their_arguments(self) -> None:
        cases = {
            "tcp:11435": ("tcp", {"port": "11435"}),
            "tcp:0:interface=127.0.0.1": ("tcp", {"port": "0", "interface": "127.0.0.1"}),
            "tcp:port=80:interface=10.0.0.2": ("tcp", {"port": "80", "interface": "10.0.0.2"}),
            "tcp:11435:127.0.0.1:9": (
                "tcp", {"port": "11435", "interface": "127.0.0.1", "backlog": "9"}
            ),
            "tcp6:11435:5": ("tcp6", {"port": "11435", "backlog": "5"}),  # tcp6's own order
            "tcp6:0:interface=\\:\\:1": ("tcp6", {"port": "0", "interface": "::1"}),
            "ssl:443:privateKey=k.pem:certKey=c.pem": (
                "ssl", {"port": "443", "privateKey": "k.pem", "certKey": "c.pem"}
            ),
            "ssl:443:privateKey=C\\:/k=1.pem": ("ssl", {"port": "443", "privateKey": "C:/k=1.pem"}),
            "unix:/run/ollana.sock:mode=660": (
                "unix", {"address": "/run/ollana.sock", "mode": "660"}
            ),
        }  # fmt: skip
        for text, (kind, arguments) in cases.items():
            self.assertEqual(parse_endpoint(text), ListenEndpoint(kind, arguments), text)

    def test_port(self) -> None:
        self.assertEqual(parse_endpoint("tcp:interface=127.0.0.1:port=11434").port, 11434)
        self.assertEqual(parse_endpoint("ssl:0:privateKey=k.pem").port, 0)
        self.assertIsNone(parse_endpoint("unix:/run/ollana.sock").port)

    def test_read_as_twisted_reads_it(self) -> None:
        """The port and interface are those of the endpoint Twisted makes of the text."""
        for text in ("tcp:11435:interface=127.0.0.1", "tcp:port=8080", "tcp:0:10.0.0.2:9"):
            reactor = MemoryReactor()
            serverFromString(reactor, text).listen(None)
            [(port, _, backlog, interface)] = reactor.tcpServers
            endpoint = parse_endpoint(text)
            self.assertEqual(endpoint.port, port)
            self.assertEqual(endpoint.arguments.get("interface", ""), interface)
            self.assertEqual(int(endpoint.arguments.get("backlog", 50)), backlog)

    def test_refused_with_a_reason(self) -> None:
        cases = {
            "": "Unknown endpoint type: ''",
            "11435": "Unknown endpoint type: '11435'",  # Twisted's serverFromString: the same
            "carrier-pigeon:1": "Unknown endpoint type: 'carrier-pigeon'",
            "systemd:domain=INET:index=0": "Unknown endpoint type: 'systemd'",
            "port=80": "Unknown endpoint type: ''",
            "tcp": "no port",
            "unix:mode=660": "no address",
            "tcp:abc": "invalid literal for int() with base 10: 'abc'",
            "tcp:": "invalid literal for int() with base 10: ''",
            "tcp:80:backlog=many": "invalid literal for int() with base 10: 'many'",
            "unix:/s:mode=rw": "invalid literal for int() with base 8: 'rw'",
            "tcp:80:a:b:c": "tcp takes at most 3 arguments (port, interface, backlog)",
            "tcp:80:foo=1": "tcp has no argument 'foo'",
            "tcp:80:port=81": "port given twice",
            "tcp:80\\": "it ends in a backslash",
        }
        for text, reason in cases.items():
            e = self.assertRaises(ValueError, parse_endpoint, text)
            self.assertEqual(str(e), reason, text)


class CheckEndpointTests(SynchronousTestCase):
    """--listen's check: one line naming the option, never a traceback."""

    def refused(self, text: str) -> str:
        message = str(self.assertRaises(UsageError, check_endpoint, text))
        self.assertNotIn("\n", message)
        return message

    def test_accepted(self) -> None:
        for text in ("tcp:0:interface=127.0.0.1", "tcp6:11435", "unix:/run/ollana.sock"):
            self.assertEqual(check_endpoint(text), text)

    def test_refused(self) -> None:
        self.assertEqual(
            self.refused("tcp:abc"),
            "--listen: not a valid endpoint description: 'tcp:abc' "
            "(invalid literal for int() with base 10: 'abc')",
        )
        self.assertEqual(self.refused("tcp:99999"), "--listen: port must be 0-65535, not 99999")
        self.assertEqual(self.refused("tcp:-1"), "--listen: port must be 0-65535, not -1")
        self.assertEqual(
            self.refused("tcp:1:foo=2"),
            "--listen: not a valid endpoint description: 'tcp:1:foo=2' (tcp has no argument 'foo')",
        )
        e = self.assertRaises(UsageError, check_endpoint, "tcp:x", "OLLANA_LISTEN")
        self.assertTrue(str(e).startswith("OLLANA_LISTEN: "), str(e))

    def test_ssl_files_must_be_readable(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        key = os.path.join(directory, "key.pem")
        with open(key, "wb") as f:
            f.write(b"not read further: the endpoint checks it when it is made")
        self.assertEqual(check_endpoint(f"ssl:443:privateKey={key}"), f"ssl:443:privateKey={key}")
        missing = os.path.join(directory, "cert.pem")
        text = f"ssl:443:privateKey={key}:certKey={missing}"
        self.assertEqual(
            self.refused(text),
            f"--listen: not a valid endpoint description: {text!r} "
            f"([Errno 2] No such file or directory: {missing!r})",
        )
