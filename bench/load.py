"""A small HTTP/1.1 load generator, run as its own process: `python -m bench.load`.

Each of C connections sends requests back to back over keep-alive and records latencies, or
with `--pause-ms P` waits a random 0.5 P to 1.5 P before each request: sporadic traffic, where
the server and the machine are idle when a request arrives. It speaks just enough HTTP for
Tandem's responses (Content-Length bodies), so it costs the machine little CPU next to the
server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tally:
    budget: int
    stop_at: float
    pause_s: float = 0.0  # mean pause before each request; 0: back to back
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    # With --split: per answered request, its latency and the service's own timings.
    split: list[list[float]] | None = None


def build_request(port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def _record_split(tally: Tally, latency: float, status: int, body: bytes) -> None:
    """The service's timings from a /predict answer: read after the clock stopped."""
    if tally.split is None or status != 200:
        return
    timings = json.loads(body)["timings"]
    tally.split.append(
        [
            latency,
            timings["total_ms"] / 1000,
            timings["decode_ms"] / 1000,
            timings["fast_ms"] / 1000,
        ]
    )


async def _connection(port: int, request: bytes, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < tally.stop_at and tally.budget > 0:
            tally.budget -= 1
            if tally.pause_s:
                await asyncio.sleep(tally.pause_s * random.uniform(0.5, 1.5))
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, body = await _read_response(reader)
            latency = time.perf_counter() - started
            tally.statuses[status] += 1
            tally.latencies.append(latency)
            _record_split(tally, latency, status, body)
    finally:
        writer.close()


async def run(port: int, request: bytes, concurrency: int, tally: Tally) -> dict[str, object]:
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, request, tally) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    result = {
        "latencies_s": tally.latencies,
        "statuses": dict(tally.statuses),
        "elapsed_s": elapsed,
    }
    return result if tally.split is None else result | {"split_s": tally.split}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=10**9)
    parser.add_argument("--pause-ms", type=float, default=0.0, help="mean pause before a request")
    parser.add_argument(
        "--split",
        action="store_true",
        help="also keep each answer's timings: latency, total, decode, fast",
    )
    args = parser.parse_args()
    request = build_request(args.port, args.path, args.body.read_bytes(), args.content_type)
    tally = Tally(
        budget=args.requests,
        stop_at=time.perf_counter() + args.duration,
        pause_s=args.pause_ms / 1000,
        split=[] if args.split else None,
    )
    json.dump(asyncio.run(run(args.port, request, args.concurrency, tally)), sys.stdout)


if __name__ == "__main__":
    main()
