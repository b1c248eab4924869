"""Deadline: a response that has not begun in time is a 504; one that has begun runs on."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from tandem.api.guards import Deadline

SECONDS = 0.05


async def _slow_to_begin(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(SECONDS * 10)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"late"})


async def _stream(scope: Scope, receive: Receive, send: Send) -> None:
    """Begins at once, then sends its events well past the deadline."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for n in range(3):
        await asyncio.sleep(SECONDS * 2)
        await send({"type": "http.response.body", "body": b"event %d\n" % n, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _call(app: Deadline) -> list[Message]:
    scope: Scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_response_not_begun_in_time_is_a_504() -> None:
    start, body = await _call(Deadline(_slow_to_begin, SECONDS))
    assert start["status"] == 504
    assert json.loads(body["body"])["error"]["code"] == "timeout"


async def test_a_response_that_has_begun_runs_past_the_deadline() -> None:
    start, *body = await _call(Deadline(_stream, SECONDS))
    assert start["status"] == 200
    assert b"".join(m["body"] for m in body) == b"event 0\nevent 1\nevent 2\n"
