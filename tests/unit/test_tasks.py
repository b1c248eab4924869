"""Stopping a background task, even one that lost its first cancellation; waiting for the
first of several things."""

from __future__ import annotations

import asyncio

import pytest

from tandem.tasks import first_set, stop


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


async def test_first_set_returns_on_whichever_comes_first_and_leaves_no_waiter() -> None:
    quiet, told = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, told.set)
    async with asyncio.timeout(5):
        await first_set(quiet, None, told, within_s=30)
        assert told.is_set()
        assert not quiet.is_set()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, done.set_result, None)
        await first_set(quiet, within_s=30, done=done)
        assert done.done()
        started = asyncio.get_running_loop().time()
        await first_set(quiet, within_s=0.1)
        assert asyncio.get_running_loop().time() - started >= 0.1
    # Each event's waiter was cancelled: none is left pending on the loop.
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
