"""The load generator: back to back, or sporadic with a pause before each request."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.load import Tally, build_request, run

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that answers every request at once."""
    while head := await reader.readuntil(b"\r\n\r\n"):
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(ANSWER)
        await writer.drain()


@pytest.mark.parametrize("pause_s", [0.0, 0.03])
async def test_a_pause_comes_before_each_request_and_stays_out_of_its_latency(
    pause_s: float,
) -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        tally = Tally(budget=6, stop_at=time.perf_counter() + 30, pause_s=pause_s)
        result = await run(port, build_request(port, "/predict", b"x" * 10, "image/jpeg"), 2, tally)
    finally:
        server.close()
    latencies = result["latencies_s"]
    assert isinstance(latencies, list)
    assert len(latencies) == 6
    assert result["statuses"] == {200: 6}
    elapsed = result["elapsed_s"]
    assert isinstance(elapsed, float)
    # Two connections, three requests each, each after a pause of at least half pause_s.
    assert elapsed >= 3 * pause_s / 2
    if pause_s:
        assert max(latencies) < pause_s / 2  # the pause is not the request's time
