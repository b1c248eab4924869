"""The soak's sampling, when what it reads is not there."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from bench.soak import Sample, Samples, System, Tally, Unsampled, queue_length_in, sample_every

METRICS = """# TYPE tandem_store_up gauge
tandem_store_up 1.0
# TYPE tandem_queue_length gauge
tandem_queue_length 12.0
tandem_queue_length_by_key{key="alice"} 3.0
"""


def test_the_queue_length_is_read_from_its_own_line() -> None:
    assert queue_length_in(METRICS) == 12.0


def test_metrics_without_the_store_s_readings_are_unsampled() -> None:
    with pytest.raises(Unsampled, match="store was away"):
        queue_length_in("# TYPE tandem_store_up gauge\ntandem_store_up 0.0\n")


class _StoreAwayOnce(System):
    """Its store away at the first sample, back for the rest."""

    def __init__(self) -> None:  # no process: sample() is all the loop calls
        self.calls = 0
        self.back = threading.Event()  # set at the sample after the outage

    def sample(self, started: float) -> Sample:
        self.calls += 1
        if self.calls == 1:
            raise Unsampled("no tandem_queue_length on /metrics: the store was away")
        self.back.set()
        return Sample(float(self.calls), {"queue length": 0.0})


async def test_a_sample_the_store_was_away_for_is_counted_and_the_sampling_goes_on(
    tmp_path: Path,
) -> None:
    """/metrics leaves the queue out while the store is away: at the first such scrape the
    sampler had hung for good, taking no more samples while the traffic went on (the reading
    raised StopIteration, which asyncio cannot set on the thread's future)."""
    system, taken, tally = _StoreAwayOnce(), Samples(tmp_path / "samples.jsonl"), Tally()
    sampling = asyncio.create_task(sample_every(system, 0.01, 0.0, taken, tally))
    sampled_again = await asyncio.to_thread(system.back.wait, 10)
    assert not sampling.done(), sampling.exception()
    assert sampled_again
    sampling.cancel()
    assert tally.unexpected == {
        "sampling: Unsampled('no tandem_queue_length on /metrics: the store was away')": 1
    }
