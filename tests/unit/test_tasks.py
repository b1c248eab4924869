"""Stopping a background task, even one that lost its first cancellation."""

from __future__ import annotations

import asyncio

import pytest

from tandem.tasks import stop


async def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    """As a library whose retry took a cancel for its own timeout, and read on."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        for _ in range(10):  # bounded, so that a stop that waits for good fails, not hangs
            try:
                await asyncio.sleep(2)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await stop(task, recancel_s=0.05)
    assert task.cancelled()
    assert swallowed == 3


async def test_a_task_s_own_fault_is_raised_and_none_is_stopped_already() -> None:
    async def faulty() -> None:
        raise RuntimeError("its own")

    task = asyncio.create_task(faulty())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="its own"):
        await stop(task)
    await stop(None)
