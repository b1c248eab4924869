"""A small HTTP/1.1 load generator, run as its own process: `python -m bench.load`.

Each of C connections sends requests back to back over keep-alive and records latencies. It
speaks just enough HTTP for Tandem's responses (Content-Length bodies), so it costs the machine
little CPU next to the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tally:
    budget: int
    stop_at: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


def build_request(port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _connection(port: int, request: bytes, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < tally.stop_at and tally.budget > 0:
            tally.budget -= 1
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            tally.statuses[await _read_response(reader)] += 1
            tally.latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def run(port: int, request: bytes, concurrency: int, tally: Tally) -> dict[str, object]:
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, request, tally) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"latencies_s": tally.latencies, "statuses": dict(tally.statuses), "elapsed_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=10**9)
    args = parser.parse_args()
    request = build_request(args.port, args.path, args.body.read_bytes(), args.content_type)
    tally = Tally(budget=args.requests, stop_at=time.perf_counter() + args.duration)
    json.dump(asyncio.run(run(args.port, request, args.concurrency, tally)), sys.stdout)


if __name__ == "__main__":
    main()
