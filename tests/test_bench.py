"""The benchmarks' own machinery: the harness's processes (ready, stopped whatever
happens), the registry of parts, the tables and the baseline's ratios. The benchmarks
themselves are run by hand (``python -m bench.run``, docs/benchmarks.rst)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.trial.unittest import SynchronousTestCase

from bench import harness, parts
from bench.smallget import Result, median, table
from bench.tables import against_base, base_of, rst_table

# A process that says its port and then waits to be stopped.
SAYS_PORT = "import time; print('port 4242', flush=True); time.sleep(60)"


class ProcessesTests(SynchronousTestCase):
    def test_ready_then_stopped_at_an_error(self) -> None:
        """The port a process prints is read once it is printed; the process is stopped
        when the block ends with an error."""
        workdir = self.mktemp()
        with self.assertRaises(RuntimeError):
            with harness.Processes(workdir) as processes:
                process = processes.python("sayer", "-c", SAYS_PORT)
                self.assertEqual(processes.port("sayer"), 4242)
                raise RuntimeError("a part broke")
        self.assertIsNotNone(process.poll())
        self.assertTrue(os.path.exists(os.path.join(workdir, "sayer.out")))

    def test_exited_before_ready(self) -> None:
        """A process that exits without saying its port is reported, with its output."""
        with harness.Processes(self.mktemp()) as processes:
            processes.python("quitter", "-c", "print('no port here'); raise SystemExit(3)")
            with self.assertRaises(harness.DidNotStart) as caught:
                processes.port("quitter")
            self.assertIn("quitter exited (3)", str(caught.exception))
            self.assertIn("quitter.out: no port here", processes.exited())

    def test_checkout(self) -> None:
        """A process started from another checkout runs in it, with it first on its path;
        twistd's plugin loads this tree's ollana.tap when there is no other."""
        env = harness.environment("/elsewhere")
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], "/elsewhere")
        self.assertNotIn("OLLANA_SECRET", env)
        origin = harness.ollana_origin()
        self.assertEqual(origin, os.path.join(harness.ROOT, "ollana", "tap.py"))

    def test_node_discovery(self) -> None:
        """A node's discovery is off, or broadcast on loopback only."""
        self.assertEqual(harness.discovery_options(0), ["--no-discovery"])
        self.assertEqual(
            harness.discovery_options(5555),
            ["--broadcast", "127.255.255.255", "--discovery-port", "5555"],
        )


class RegistryTests(SynchronousTestCase):
    def test_parts_registered_in_order(self) -> None:
        from bench import run  # its import registers every part

        self.assertEqual(run.PART_MODULES[0], "bench.smallget")
        self.assertEqual(
            list(parts.PARTS), ["get", "streams", "memory", "blob", "timings", "routing"]
        )
        streaming = {parts.PARTS[name].setup for name in ("streams", "memory", "blob")}
        self.assertEqual(len(streaming), 1, "the streaming parts share their processes")

    def test_a_name_once(self) -> None:
        self.patch(parts, "PARTS", {})

        @contextmanager
        def setup(context: parts.Context) -> Iterator[int]:
            yield 1

        def measure(context: parts.Context, value: int) -> parts.Measured:
            return parts.Measured(value, f"{value}")

        parts.register("one", "the first", setup)(measure)
        with self.assertRaises(ValueError):
            parts.register("one", "again", setup)(measure)
        part = parts.PARTS["one"]
        context = parts.Context(argparse.Namespace(), "/tmp", "wrk", None, None)
        with part.setup(context) as value:
            self.assertEqual(part.measure(context, value), parts.Measured(1, "1"))


class TablesTests(SynchronousTestCase):
    def test_rst_table(self) -> None:
        self.assertEqual(
            rst_table(["name", "n"], [["a", "1"], ["bb", "22"]]),
            "====  ==\nname   n\n====  ==\na      1\nbb    22\n====  ==",
        )
        self.assertEqual(
            rst_table(["name", "n"], [["a", "1"]], left=(0, 1)),
            "====  =\nname  n\n====  =\na     1\n====  =",
        )

    def test_base_of(self) -> None:
        self.assertEqual(base_of("ollana 1 hop"), "ollana@base 1 hop")
        self.assertEqual(base_of("ollana 2 hops"), "ollana@base 2 hops")
        self.assertEqual(base_of("ollana@base 2 hops"), "ollana@base 2 hops")
        self.assertIsNone(base_of("stock"))

    def test_against_base(self) -> None:
        rows = {
            "direct": {"p99": 1.0},
            "ollana 1 hop": {"p99": 3.0},
            "ollana@base 1 hop": {"p99": 2.0},
        }
        self.assertIn(
            "- ollana 1 hop over ollana@base 1 hop: p99 1.50×", against_base(rows, {"p99": "p99"})
        )
        del rows["ollana@base 1 hop"]
        self.assertEqual(against_base(rows, {"p99": "p99"}), "")

    def test_small_get_table_with_a_baseline(self) -> None:
        results = [
            Result("direct", 1, 1000.0, 0.001, 0.002, 0),
            Result("stock", 1, 100.0, 0.002, 0.004, 0),
            Result("ollana 1 hop", 1, 300.0, 0.0015, 0.003, 0),
            Result("ollana@base 1 hop", 1, 200.0, 0.0017, 0.003, 0),
        ]
        text = table(results, {"ollana 1 hop": 1, "ollana@base 1 hop": 1})
        header, ours, theirs = text.splitlines()[1], text.splitlines()[5], text.splitlines()[6]
        self.assertTrue(header.endswith("× base"))
        self.assertTrue(ours.startswith("ollana 1 hop") and ours.endswith("1.50"))
        self.assertTrue(theirs.endswith("1.00"))
        self.assertIn("- ollana@base 1 hop: 0.700 ms", text)
        self.assertNotIn("× base", table(results[:3], {}))

    def test_median_of_rounds(self) -> None:
        rounds = [
            Result("x", 1, rps, p50, 0.01, 1) for rps, p50 in ((3.0, 0.3), (1.0, 0.1), (2.0, 0.2))
        ]
        self.assertEqual(median(rounds), Result("x", 1, 2.0, 0.2, 0.01, 3))
