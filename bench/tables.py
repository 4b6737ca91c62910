"""The benchmarks' tables: reStructuredText simple tables, readable in a terminal and
pasted as they are into docs/benchmarks.rst, and the ratios they show."""

from __future__ import annotations

from collections.abc import Container

BASE = "ollana@base"  # the rows of --baseline's checkout: "ollana@base 1 hop", ...


def rst_table(header: list[str], rows: list[list[str]], left: Container[int] = (0,)) -> str:
    """A simple table; the columns numbered in left are aligned left, the others right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([rule, line(header), rule, *(line(row) for row in rows), rule])


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def base_of(target: str) -> str | None:
    """The baseline's row an Ollana row is compared with ("ollana 1 hop": "ollana@base 1
    hop"); None for the others."""
    if target.startswith("ollana "):
        return BASE + target.removeprefix("ollana")
    if target.startswith(BASE):
        return target
    return None


def against_base(rows: dict[str, dict[str, float]], figures: dict[str, str]) -> str:
    """Each Ollana row's figures over its baseline row's: "figure: 0.97×" (figures: key
    in a row -> its name); empty without baseline rows."""
    lines = []
    for target, row in rows.items():
        base = base_of(target)
        if base is None or base == target or base not in rows:
            continue
        found = ", ".join(
            f"{name} {ratio(row[key], rows[base][key])}×" for key, name in figures.items()
        )
        lines.append(f"- {target} over {base}: {found}")
    if not lines:
        return ""
    return "\n\nAgainst the baseline (this tree's figure over the baseline's):\n\n" + "\n".join(
        lines
    )
