"""The accurate answer's latency histogram, as counters in the job store."""

from __future__ import annotations

from collections import Counter

import pytest

from tandem.jobs.latency import BOUNDS, AnswerLatency, answered_counts


def _histogram(*waits: float) -> AnswerLatency:
    counts: Counter[str] = Counter()
    for waited in waits:
        counts.update(answered_counts(waited))
    return AnswerLatency.from_counts(counts)


def _bucket(waited: float) -> str:
    """The bound of the first bucket that counts this wait."""
    return next(le for le, count in _histogram(waited).buckets if count)


@pytest.mark.parametrize(
    ("waited", "bound"),
    [(0.0, "0.05"), (0.05, "0.05"), (0.0501, "0.1"), (2.0, "2.5"), (3600.0, "3600.0")],
)
def test_a_wait_counts_in_the_first_bucket_whose_bound_it_does_not_pass(
    waited: float, bound: str
) -> None:
    assert _bucket(waited) == bound


def test_a_wait_past_the_last_bound_counts_only_in_the_infinite_bucket() -> None:
    histogram = _histogram(BOUNDS[-1] + 1)
    assert [count for _, count in histogram.buckets] == [0] * len(BOUNDS) + [1]
    assert histogram.buckets[-1][0] == "+Inf"


def test_a_worker_clock_behind_the_proxy_counts_as_no_wait() -> None:
    histogram = _histogram(-3.0)
    assert _bucket(-3.0) == "0.05"
    assert histogram.sum_s == 0.0


def test_buckets_are_cumulative_and_the_sum_adds_every_wait() -> None:
    histogram = _histogram(0.02, 0.3, 0.3, 45.0)
    cumulative = dict(histogram.buckets)
    assert (cumulative["0.05"], cumulative["0.25"], cumulative["0.5"]) == (1, 1, 3)
    assert (cumulative["30.0"], cumulative["60.0"], cumulative["+Inf"]) == (3, 4, 4)
    assert histogram.count == 4
    assert histogram.sum_s == pytest.approx(45.62)


def test_no_answers_yet_is_an_empty_histogram() -> None:
    histogram = AnswerLatency.from_counts({})
    assert histogram.count == 0
    assert histogram.sum_s == 0.0
    assert len(histogram.buckets) == len(BOUNDS) + 1
