"""The benchmark's chart: a small SVG of horizontal bars, written by bench.run.

Up to three panels, from what was measured: requests/s of the small GET at the highest
concurrency, the p99 delay of NDJSON lines at many streams, and peak RSS with many
streams open. No plotting library: the SVG is a few rectangles and labels.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

WIDTH = 760
ROW = 22
LABEL = 120  # the width of the target names
COLOURS = {"ollana 1 hop": "#2f6fb3", "ollana 2 hops": "#6a9fd4"}
OTHER = "#9a9a9a"


def svg(figures: dict[str, Any]) -> str:
    panels = []
    get = figures.get("get")
    if get:
        top = max(r.concurrency for r in get)
        panels.append(
            (
                f"Small GET, concurrency {top}: requests/s (more is better)",
                [(r.target, r.rps, f"{r.rps:,.0f}") for r in get if r.concurrency == top],
            )
        )
    streams = figures.get("streams")
    if streams:
        panels.append(
            (
                "NDJSON streams: p99 delay per line, ms (less is better)",
                [(name, r["p99"] * 1e3, f"{r['p99'] * 1e3:.1f}") for name, r in streams.items()],
            )
        )
    memory = figures.get("memory")
    if memory:
        panels.append(
            (
                "Streams held open: peak RSS, MB (less is better)",
                [(name, r["peak_mb"], f"{r['peak_mb']:.0f}") for name, r in memory.items()],
            )
        )
    parts: list[str] = []
    y = 10
    for title, bars in panels:
        parts.append(f'<text x="10" y="{y + 14}" font-weight="bold">{escape(title)}</text>')
        y += 26
        biggest = max((value for _, value, _ in bars), default=0) or 1
        span = WIDTH - LABEL - 90
        for name, value, text in bars:
            width = max(1.0, span * value / biggest)
            colour = COLOURS.get(name, OTHER)
            parts.append(
                f'<text x="{LABEL - 6}" y="{y + 15}" text-anchor="end">{escape(name)}</text>'
                f'<rect x="{LABEL}" y="{y + 3}" width="{width:.1f}" height="{ROW - 6}" '
                f'fill="{colour}"/>'
                f'<text x="{LABEL + width + 6:.1f}" y="{y + 15}">{escape(text)}</text>'
            )
            y += ROW
        y += 14
    note = escape(figures.get("machine", ""))
    parts.append(f'<text x="10" y="{y + 12}" font-size="10" fill="#555">{note}</text>')
    height = y + 24
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>' + "".join(parts) + "</svg>\n"
    )
