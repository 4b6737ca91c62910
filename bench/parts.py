"""The registry of bench.run's parts: each part module registers a part's name, help and
function here, and bench.run runs those that ``--parts`` names, in the order registered.

A part's function is given the run's ``Context`` and what its setup started, and returns
what it measured: figures (written to ``--json``, drawn by the chart) and a report (the
tables bench.run prints). Parts that share a setup (the same function, registered one
after the other) run on one set of processes, started once for them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """What every part is given: the options and what run.py found before any part."""

    args: argparse.Namespace  # bench.run's options
    workdir: str  # the run's directory: each setup makes a directory of its own in it
    load: str  # the load generator: "wrk" or "builtin"
    nginx: str | None  # the nginx binary, None: no nginx rows
    baseline: str | None  # another checkout of Ollana, for the "ollana@base" rows


@dataclass(frozen=True)
class Measured:
    """What a part measured: figures for --json and the chart, and a report to print."""

    figures: object
    report: str


Setup = Callable[[Context], AbstractContextManager[T]]
Measure = Callable[[Context, T], Measured]


@dataclass(frozen=True)
class Part(Generic[T]):
    """One part of bench.run: its name in --parts, a line of help, its setup and its
    function."""

    name: str
    help: str
    setup: Setup[T]
    measure: Measure[T]


@contextmanager
def nothing(context: Context) -> Iterator[None]:
    """The setup of a part that starts its own processes."""
    yield None


# Part[Any]: each part's setup gives its function a value of its own type.
PARTS: dict[str, Part[Any]] = {}


def register(name: str, help: str, setup: Setup[T]) -> Callable[[Measure[T]], Measure[T]]:
    """Register the decorated function as the part name of bench.run."""

    def add(measure: Measure[T]) -> Measure[T]:
        if name in PARTS:
            raise ValueError(f"a part {name!r} is registered already")
        PARTS[name] = Part(name, help, setup, measure)
        return measure

    return add
