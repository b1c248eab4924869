"""BodyLimit's time for a body: a fixed start, and more for each byte that arrives."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from starlette.types import Message, Receive, Scope, Send

from tandem.api.guards import API_KEY_ID, BodyLimit

TIMEOUT_S = 0.2
RATE = 10_000  # bytes a second


async def _echo_size(scope: Scope, receive: Receive, send: Send) -> None:
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % len(body)})


@dataclass
class Halt:
    """Where a body stops short of its last piece until the test resumes it."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)


async def _send_in_pieces(
    limit: BodyLimit,
    pieces: int,
    size: int,
    gap_s: float,
    *,
    key: str | None = None,
    halt: Halt | None = None,
) -> Message:
    """The response start and body, to a body sent as `pieces` of `size` bytes `gap_s` apart
    by the client `key` names; with `halt`, the last piece waits for it."""
    scope: Scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    if key is not None:
        scope["state"] = {API_KEY_ID: key}
    sent: list[Message] = []
    left = pieces

    async def receive() -> Message:
        nonlocal left
        await asyncio.sleep(gap_s)
        if halt is not None and left == 1:
            halt.reached.set()
            await halt.resume.wait()
        left -= 1
        return {"type": "http.request", "body": b"x" * size, "more_body": left > 0}

    async def send(message: Message) -> None:
        sent.append(message)

    await limit(scope, receive, send)
    start, body = sent
    return {"status": start["status"], "body": body["body"]}


def _limit(min_rate_bytes_s: float, per_key_bytes: int = 0) -> BodyLimit:
    return BodyLimit(
        _echo_size,
        max_bytes=1 << 20,
        timeout_s=TIMEOUT_S,
        min_rate_bytes_s=min_rate_bytes_s,
        held_max_bytes=1 << 20,
        retry_after_s=1,
        per_key_bytes=per_key_bytes,
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


async def test_a_client_s_bodies_beyond_its_share_get_429_while_others_are_taken() -> None:
    limit = _limit(RATE, per_key_bytes=5000)
    # Client a's upload holds 3,000 bytes, its last 1,000 to come; meanwhile its second body
    # would take it past 5,000.
    halt = Halt()
    slow = asyncio.create_task(
        _send_in_pieces(limit, pieces=4, size=1000, gap_s=0, key="a", halt=halt)
    )
    await halt.reached.wait()
    assert limit.held_by_key.as_dict() == {"a": 3000}
    refused = await _send_in_pieces(limit, pieces=4, size=1000, gap_s=0, key="a")
    assert refused["status"] == 429
    error = json.loads(refused["body"])["error"]
    assert (error["code"], error["details"]["limit_bytes"]) == ("too_many_requests", 5000)
    # Another client's body, and a keyless one (open paths), are held from the pool alone.
    for key in ("b", None):
        other = await _send_in_pieces(limit, pieces=4, size=1000, gap_s=0, key=key)
        assert other == {"status": 200, "body": b"4000"}
    halt.resume.set()
    assert await slow == {"status": 200, "body": b"4000"}
    # Everything is given back, and client a is forgotten.
    assert (limit.held, limit.held_by_key.as_dict()) == (0, {})
    again = await _send_in_pieces(limit, pieces=5, size=1000, gap_s=0, key="a")
    assert again == {"status": 200, "body": b"5000"}
