"""What Python's cyclic collector would have to free: the objects left in reference cycles
by what a test does (``Cycles``), counted by type."""

from __future__ import annotations

import gc
from collections import Counter
from types import TracebackType


class Cycles:
    """Within ``with Cycles() as cycles:``, objects that become unreachable only by way of
    the cyclic collector are kept; after the block, ``cycles.left`` counts those of the
    modules named (by prefix) by type name."""

    def __init__(self, *modules: str) -> None:
        self.modules = modules or ("ollana.",)
        self.left: Counter[str] = Counter()

    def __enter__(self) -> Cycles:
        gc.collect()  # what came before is not counted
        self._debug = gc.get_debug()
        self._garbage = list(gc.garbage)
        gc.garbage.clear()
        gc.set_debug(gc.DEBUG_SAVEALL)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        gc.collect()
        found = list(gc.garbage)
        gc.set_debug(self._debug)
        gc.garbage[:] = self._garbage
        for thing in found:
            module = type(thing).__module__ + "."
            if module.startswith(self.modules):
                self.left[f"{type(thing).__module__}.{type(thing).__qualname__}"] += 1
        found.clear()
