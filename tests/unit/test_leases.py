"""Which leases a worker renews: a job's, while any part of the worker holds it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest

from tandem.errors import QueueUnavailable
from tandem.jobs.leases import Leases
from tandem.jobs.store import JobStore, StorePolicy


class Recording:
    """The part of a store that leases use: renews what it is asked, and says what it was."""

    policy = StorePolicy(visibility_timeout_s=0.03)

    def __init__(self, down: bool = False) -> None:
        self.asked: list[list[str]] = []
        self.down = down

    async def extend(self, worker_id: str, job_ids: Sequence[str]) -> frozenset[str]:
        if self.down:
            raise QueueUnavailable("Redis is unavailable")
        self.asked.append(list(job_ids))
        return frozenset(job_ids)


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


async def test_a_renewal_the_store_refuses_is_tried_again_next_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Recording(down=True)
    leases = Leases(cast(JobStore, store), "w")
    leases.hold(["a"])
    await leases.renew()
    assert "leases of 1 jobs not renewed: Redis is unavailable" in caplog.text
    store.down = False
    await leases.renew()
    assert store.asked == [["a"]]
