"""BodyLimit's time for a body: a fixed start, and more for each byte that arrives."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from tandem.api.guards import BodyLimit

TIMEOUT_S = 0.2
RATE = 10_000  # bytes a second


async def _echo_size(scope: Scope, receive: Receive, send: Send) -> None:
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % len(body)})


async def _send_in_pieces(limit: BodyLimit, pieces: int, size: int, gap_s: float) -> Message:
    """The response start and body, to a body sent as `pieces` of `size` bytes `gap_s` apart."""
    scope: Scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    sent: list[Message] = []
    left = pieces

    async def receive() -> Message:
        nonlocal left
        await asyncio.sleep(gap_s)
        left -= 1
        return {"type": "http.request", "body": b"x" * size, "more_body": left > 0}

    async def send(message: Message) -> None:
        sent.append(message)

    await limit(scope, receive, send)
    start, body = sent
    return {"status": start["status"], "body": body["body"]}


def _limit(min_rate_bytes_s: float) -> BodyLimit:
    return BodyLimit(
        _echo_size,
        max_bytes=1 << 20,
        timeout_s=TIMEOUT_S,
        min_rate_bytes_s=min_rate_bytes_s,
        held_max_bytes=1 << 20,
        retry_after_s=1,
    )


async def test_a_body_arriving_faster_than_the_minimum_rate_may_outlast_the_timeout() -> None:
    # 20,000 bytes/s for 0.5 s: each piece earns 0.1 s, twice the gap before the next.
    answer = await _send_in_pieces(_limit(RATE), pieces=10, size=1000, gap_s=0.05)
    assert answer == {"status": 200, "body": b"10000"}


async def test_a_body_that_trickles_is_cut_off_soon_after_the_timeout() -> None:
    # 2,000 bytes/s: each piece earns 0.01 s of the 0.05 s it took to come.
    answer = await _send_in_pieces(_limit(RATE), pieces=40, size=100, gap_s=0.05)
    assert answer["status"] == 408
    error = json.loads(answer["body"])["error"]
    assert error["code"] == "receive_timeout"
    # Cut off once 0.05 k passed 0.2 + 0.01 k, at about the 5th piece, not after all 40 (2 s).
    assert TIMEOUT_S < error["details"]["seconds"] < TIMEOUT_S + 0.15


async def test_with_no_minimum_rate_a_body_has_the_timeout_in_all() -> None:
    answer = await _send_in_pieces(_limit(0), pieces=10, size=1000, gap_s=0.05)
    assert answer["status"] == 408
    assert json.loads(answer["body"])["error"]["details"]["seconds"] == TIMEOUT_S
