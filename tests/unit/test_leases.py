"""Which leases a worker renews: a job's, while any part of the worker holds it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest

from tandem import tasks
from tandem.errors import QueueUnavailable
from tandem.jobs.leases import Leases
from tandem.jobs.store import JobStore, StorePolicy


class Recording:
    """The part of a store that leases use: renews what it is asked, and says what it was."""

    policy = StorePolicy(visibility_timeout_s=0.03)

    def __init__(self, down: bool = False) -> None:
        self.asked: list[list[str]] = []
        self.down = down
        self.broken = False
        self.failed, self.renewed = asyncio.Event(), asyncio.Event()
        self.taken_over: frozenset[str] = frozenset()

    async def extend(self, worker_id: str, job_ids: Sequence[str]) -> frozenset[str]:
        await asyncio.sleep(0)  # a round trip: the worker may let go of a job meanwhile
        if self.down:
            raise QueueUnavailable("Redis is unavailable")
        if self.broken:
            self.failed.set()
            raise RuntimeError("a bug")
        self.asked.append(list(job_ids))
        self.renewed.set()
        return frozenset(job_ids) - self.taken_over


async def test_a_job_is_renewed_while_any_hold_on_it_lasts() -> None:
    store = Recording()
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a", "b"])  # a batch's claim
    leases.hold(["a"])  # then the storing of a's answer, past its batch
    await leases.renew()
    leases.release(["a", "b"])  # the batch is done
    await leases.renew()
    leases.release(["a"])  # a's answer is stored
    await leases.renew()
    assert store.asked == [["a", "b"], ["a"]]
    assert leases.held == frozenset()


async def test_a_finished_job_is_not_renewed_whatever_still_holds_it() -> None:
    store = Recording()
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a", "b"])  # a batch's claim
    leases.hold(["a", "b"])  # the storing of their answers
    leases.finished(["a"])  # a's answer is stored; its webhook still to go
    await leases.renew()
    leases.release(["a", "b"])  # the batch is done
    leases.release(["a", "b"])  # the storing too
    leases.hold(["c"])
    await leases.renew()
    assert store.asked == [["b"], ["c"]]  # never a again, and no hold of a left below zero
    assert leases.held == frozenset({"c"})


async def test_a_renewal_the_store_refuses_is_tried_again_next_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Recording(down=True)
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a"])
    await leases.renew()
    assert "leases of 1 job not renewed: Redis is unavailable" in caplog.text
    store.down = False
    await leases.renew()
    assert store.asked == [["a"]]


async def test_the_keeper_goes_on_after_a_fault_it_did_not_foresee(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody awaits the keeper until the worker stops: a fault that ended it would have
    stopped every renewal, silently."""
    store = Recording()
    store.broken = True
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a"])
    keeper = asyncio.create_task(leases.keep())
    try:
        async with asyncio.timeout(5):
            await store.failed.wait()
            store.broken = False
            await store.renewed.wait()  # the next round, once the fault passed
    finally:
        await tasks.stop(keeper)
    assert "renewing the leases of 1 job failed" in caplog.text


async def test_a_lease_taken_over_is_reported_and_one_let_go_meanwhile_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Recording()
    store.taken_over = frozenset({"a", "b"})  # "b" is finished by this worker meanwhile
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a", "b", "c"])
    renewing = asyncio.create_task(leases.renew())
    await asyncio.sleep(0)  # the renewal is under way
    leases.release(["b"])
    await renewing
    assert "1 held job taken over by another worker" in caplog.text
