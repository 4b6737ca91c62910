"""Load for the streaming figures, in its own process (asyncio, raw HTTP/1.1 on sockets).

``python -m bench.streams delay URL STREAMS SECONDS``
    STREAMS connections (opened over the first second) each POST /api/generate back to
    back for SECONDS and time every
    NDJSON line: the delay of a line is when it arrived minus the ``sent`` time the
    streaming backend (bench.servers streamer) wrote into it. Prints one JSON line: lines,
    streams, errors, and the delay's p50, p99 and max in seconds.
``python -m bench.streams hold URL STREAMS SECONDS``
    Opens STREAMS streams at once and reads them; prints ``open N`` once each has sent its
    first line (or after SECONDS, with how many had), holds them SECONDS more, then prints
    a JSON line like ``delay``'s and ends.
``python -m bench.streams blob URL BYTES``
    POSTs a body of BYTES zero bytes as fast as the connection takes them and prints one
    JSON line: status, seconds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from urllib.parse import urlsplit

GENERATE = b'{"model": "bench", "prompt": "hi", "stream": true}'


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


class Stats:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.streams = 0
        self.errors = 0
        self.started = 0  # streams that have sent a first line

    def report(self) -> dict[str, float]:
        delays = sorted(self.delays)

        def pick(q: float) -> float:
            return delays[min(len(delays) - 1, int(q * len(delays)))] if delays else 0.0

        return {
            "lines": len(delays),
            "streams": self.streams,
            "errors": self.errors,
            "p50": pick(0.50),
            "p99": pick(0.99),
            "max": delays[-1] if delays else 0.0,
        }


async def one_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    path: str,
    stats: Stats,
    first: asyncio.Event | None = None,
) -> bool:
    """One POST and its streamed answer on a kept-alive connection; False on an error."""
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(GENERATE), GENERATE)
    )
    status = await reader.readline()
    if not status.startswith(b"HTTP/1.1 200"):
        return False
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    if not chunked:
        return False
    pending = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            stats.streams += 1
            return True
        arrived = time.monotonic()
        pending += data[:-2]
        *lines, pending = pending.split(b"\n")
        for text in lines:
            stats.delays.append(arrived - json.loads(text)["sent"])
            if first is not None and not first.is_set():
                first.set()
                stats.started += 1


async def delay(url: str, streams: int, seconds: float) -> Stats:
    host, port, _ = _target(url)
    stats = Stats()
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        await asyncio.sleep(n / streams)  # clients arrive over a second, not all at once
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.monotonic() < deadline:
                if not await one_stream(reader, writer, host, "/api/generate", stats):
                    stats.errors += 1
                    return
        except (OSError, ValueError, asyncio.IncompleteReadError):
            stats.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(streams)))
    return stats


async def hold(url: str, streams: int, seconds: float) -> Stats:
    host, port, _ = _target(url)
    stats = Stats()
    firsts = [asyncio.Event() for _ in range(streams)]

    async def worker(first: asyncio.Event) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats.errors += 1
            return
        try:
            if not await one_stream(reader, writer, host, "/api/generate", stats, first):
                stats.errors += 1
        except (OSError, ValueError, asyncio.IncompleteReadError):
            stats.errors += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(worker(first)) for first in firsts]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), seconds)
    except asyncio.TimeoutError:
        pass
    print(f"open {stats.started}", flush=True)
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stats


async def blob(url: str, size: int) -> dict[str, float]:
    host, port, path = _target(url)
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
        % (path.encode(), host.encode(), size)
    )
    piece = bytes(1 << 20)
    left = size
    while left > 0:
        writer.write(piece[: min(left, len(piece))])
        left -= len(piece)
        await writer.drain()
    status = await reader.readline()
    seconds = time.monotonic() - started
    writer.close()
    code = int(status.split()[1]) if status.startswith(b"HTTP/") else 0
    return {"status": code, "seconds": seconds}


def main(argv: list[str]) -> None:
    mode, url = argv[0], argv[1]
    if mode == "delay":
        # The instrument's own pauses would count as the proxies' delay: no cyclic
        # collector in its few seconds (what it leaves in cycles meanwhile is small).
        gc.disable()
        result: dict[str, float] = asyncio.run(delay(url, int(argv[2]), float(argv[3]))).report()
    elif mode == "hold":
        result = asyncio.run(hold(url, int(argv[2]), float(argv[3]))).report()
    elif mode == "blob":
        result = asyncio.run(blob(url, int(argv[2])))
    else:
        raise SystemExit(f"unknown mode {mode!r}: delay, hold or blob")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
