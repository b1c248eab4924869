"""The cascade's gate and the agreement arithmetic."""

from __future__ import annotations

import pytest

from tandem.cascade import (
    Agreement,
    Gate,
    Policy,
    SeenTally,
    bucket_of,
    judged_counts,
)
from tandem.predictions import Prediction, Scored


def prediction(*scores: tuple[str, float]) -> Prediction:
    return Prediction("m", tuple(Scored(i, label, p) for i, (label, p) in enumerate(scores)), 1.0)


SURE = prediction(("espresso", 0.95), ("cup", 0.03))
CLOSE = prediction(("espresso", 0.85), ("cup", 0.10))
UNSURE = prediction(("tiger cat", 0.39), ("tabby", 0.30))


def test_always_sends_everything() -> None:
    assert Gate().skip_reason(SURE) is None


def test_when_unsure_keeps_only_confident_answers() -> None:
    gate = Gate(Policy.WHEN_UNSURE, threshold=0.8)
    assert gate.skip_reason(UNSURE) is None
    reason = gate.skip_reason(SURE)
    assert reason is not None
    assert "0.950" in reason


def test_a_margin_must_also_be_met() -> None:
    gate = Gate(Policy.WHEN_UNSURE, threshold=0.8, margin=0.8)
    assert gate.skip_reason(SURE) is not None  # leads by 0.92
    assert gate.skip_reason(CLOSE) is None  # leads by 0.75


@pytest.mark.parametrize(
    ("probability", "bucket"), [(0.0, 0), (0.099, 0), (0.1, 1), (0.55, 5), (0.999, 9), (1.0, 9)]
)
def test_buckets_split_the_unit_interval_in_tenths(probability: float, bucket: int) -> None:
    assert bucket_of(probability) == bucket


def test_judged_counts_name_agreement_and_top5() -> None:
    accurate = prediction(("Egyptian cat", 0.6), ("tabby", 0.2), ("tiger cat", 0.1))
    assert judged_counts(UNSURE, accurate) == ["judged:3", "top5:3"]
    assert judged_counts(SURE, SURE) == ["judged:9", "agree:9", "top5:9"]


def test_seen_tally_hands_over_once_and_takes_back_what_failed() -> None:
    tally = SeenTally()
    tally.add(SURE)
    tally.add(UNSURE)
    taken = tally.take()
    assert taken == {"seen:9": 1, "seen:3": 1}
    assert tally.take() == {}
    tally.put_back(taken)
    tally.add(SURE)
    assert tally.take() == {"seen:9": 2, "seen:3": 1}


def test_threshold_estimates_from_bucket_counts() -> None:
    counts = {
        "seen:2": 4,
        "judged:2": 4,
        "agree:2": 1,
        "seen:9": 6,
        "judged:9": 3,
        "agree:9": 2,
    }
    stats = Agreement.from_counts(counts)
    assert stats.requests == 10
    assert stats.agreement == pytest.approx(3 / 7)
    at = stats.at(0.9)
    assert at.sent_share == pytest.approx(0.4)
    # sent: 4 match by construction; kept: 6 * 2/3 match.
    assert at.final_agreement == pytest.approx((4 + 4) / 10)
    assert stats.at(0.1).final_agreement == pytest.approx((4 * 0.25 + 6 * 2 / 3) / 10)


def test_no_estimate_where_a_kept_bucket_was_never_judged() -> None:
    stats = Agreement.from_counts({"seen:9": 5, "seen:1": 5, "judged:1": 5, "agree:1": 5})
    assert stats.at(0.5).sent_share == 0.5
    assert stats.at(0.5).final_agreement is None
    assert Agreement.from_counts({}).at(0.5).sent_share is None
