"""The shape of the code that README.rst promises: its table of modules lists every module
of ``ollana/``, ``tests/support/`` and ``bench/`` and nothing that is gone; every module
says what it owns; no import cycle in ``ollana/`` or ``bench/``; no test module imports
another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.processes import REPO

TABLE_ROW = re.compile(r"^``([\w/.]+)``\s", re.M)


def modules(package: str, root: Path = REPO) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The modules a file imports, as absolute dotted names, wherever the import is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def cycles(package: str, root: Path = REPO) -> list[list[str]]:
    """The import cycles among the modules of a package (each found once, from its least
    name)."""
    graph = {module_name(p, root): imported(p) for p in modules(package, root)}
    edges = {name: sorted(n for n in targets if n in graph and n != name)
             for name, targets in graph.items()}  # fmt: skip
    found: list[list[str]] = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in edges[path[-1]]:
            if nxt == start:
                found.append(path)
            elif nxt > start and nxt not in path:
                walk(start, [*path, nxt])

    for name in sorted(graph):
        walk(name, [name])
    return found


class ReadmeTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        readme = (REPO / "README.rst").read_text()
        section = readme.split("\nDeveloping\n", 1)[1].split("\nBenchmarks\n", 1)[0]
        self.listed = set(TABLE_ROW.findall(section))

    def test_every_module_is_listed(self) -> None:
        files = [*modules("ollana"), *modules("tests/support"), *modules("bench")]
        missing = []
        for path in files:
            relative = path.relative_to(REPO).as_posix()
            if path.name == "__init__.py" and path.parent.name in ("support", "bench"):
                continue  # the package's own line stands for it
            folder = path.parent.relative_to(REPO).as_posix() + "/"
            if relative not in self.listed and folder not in self.listed:
                missing.append(relative)
        self.assertEqual(missing, [], "modules missing from README.rst's table")

    def test_nothing_listed_is_gone(self) -> None:
        gone = sorted(name for name in self.listed if not (REPO / name).exists())
        self.assertEqual(gone, [], "README.rst's table lists files that do not exist")


class ModuleTests(SynchronousTestCase):
    def test_every_module_says_what_it_owns(self) -> None:
        silent = [
            path.relative_to(REPO).as_posix()
            for path in [*modules("ollana"), *modules("tests/support"), *modules("bench")]
            if not ast.get_docstring(ast.parse(path.read_text()))
            and path.read_text().strip()  # an empty __init__.py says nothing, rightly
        ]
        self.assertEqual(silent, [])

    def test_no_import_cycle(self) -> None:
        for package in ("ollana", "bench"):
            self.assertEqual(cycles(package), [], f"import cycles in {package}/")

    def test_cycles_are_found(self) -> None:
        """The cycle finder itself finds a cycle (so the test above can fail)."""
        workdir = Path(self.mktemp())
        (workdir / "pkg").mkdir(parents=True)
        (workdir / "pkg" / "a.py").write_text("from pkg import b\n")
        (workdir / "pkg" / "b.py").write_text("import pkg.a\n")
        (workdir / "pkg" / "c.py").write_text("from pkg import a\n")
        self.assertEqual(cycles("pkg", workdir), [["pkg.a", "pkg.b"]])

    def test_no_test_module_imports_another(self) -> None:
        offenders = {
            path.name: sorted(n for n in imported(path) if n.startswith("tests.test_"))
            for path in (REPO / "tests").glob("test_*.py")
        }
        self.assertEqual({k: v for k, v in offenders.items() if v}, {})
