"""The confidence-gated cascade: when the accurate model is worth running, and how often the
two models agree, bucketed by the fast model's confidence.

The agreement tallies live in the job store as plain counters, so they survive restarts and add
up across every proxy and worker that shares the store.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from tandem.predictions import Prediction

BUCKETS = 10  # by the fast model's top-1 probability: [0, .1), [.1, .2), ... [.9, 1]
# Counter names; the bucket number is appended, e.g. "seen:7".
SEEN = "seen"  # requests the fast model answered
JUDGED = "judged"  # jobs the accurate model answered
AGREE = "agree"  # ... with the same top-1 label
IN_TOP5 = "top5"  # ... with the fast top-1 among the accurate top-5


class Policy(StrEnum):
    ALWAYS = "always"  # the original's behaviour: every request gets a job
    WHEN_UNSURE = "when_unsure"  # only requests the fast model is not sure of


@dataclass(frozen=True, slots=True)
class Gate:
    """A cascade policy; `skip_reason` says why a request needs no accurate answer, or None."""

    policy: Policy = Policy.ALWAYS
    threshold: float = 0.8
    margin: float | None = None

    def skip_reason(self, fast: Prediction) -> str | None:
        if self.policy is Policy.ALWAYS:
            return None
        top1, top2 = _top_two(fast)
        if top1 < self.threshold:
            return None
        if self.margin is not None and top1 - top2 < self.margin:
            return None
        reason = f"confident: the fast top-1 probability {top1:.3f} is at least {self.threshold}"
        if self.margin is not None:
            reason += f" and leads the second by {top1 - top2:.3f} (margin {self.margin})"
        return reason


def _top_two(prediction: Prediction) -> tuple[float, float]:
    scores = [s.probability for s in prediction.top_k]
    return scores[0], scores[1] if len(scores) > 1 else 0.0


def bucket_of(probability: float) -> int:
    return min(BUCKETS - 1, max(0, math.floor(probability * BUCKETS)))


def seen_counts(fast: Prediction) -> dict[str, int]:
    return {f"{SEEN}:{bucket_of(fast.probability)}": 1}


def judged_counts(fast: Prediction, accurate: Prediction) -> list[str]:
    """Counter names to bump once the accurate answer to a job with this fast answer is stored."""
    bucket = bucket_of(fast.probability)
    names = [f"{JUDGED}:{bucket}"]
    if accurate.label == fast.label:
        names.append(f"{AGREE}:{bucket}")
    if fast.label in {s.label for s in accurate.top_k[:5]}:
        names.append(f"{IN_TOP5}:{bucket}")
    return names


def late_judgement(fast: Prediction, accurate: Prediction) -> dict[str, int]:
    """`judged_counts` for `JobStore.add_counts`, when the two answers met only after the
    result was stored (see `Completed.untallied`)."""
    return dict.fromkeys(judged_counts(fast, accurate), 1)


class SeenTally:
    """Requests counted in memory and written to the store in one call now and then, so the
    fast path pays no store round trip for statistics. A crash loses at most one interval."""

    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()

    def add(self, fast: Prediction) -> None:
        self._pending.update(seen_counts(fast))

    def take(self) -> dict[str, int]:
        taken, self._pending = dict(self._pending), Counter()
        return taken

    def put_back(self, counts: Mapping[str, int]) -> None:
        self._pending.update(counts)


@dataclass(frozen=True, slots=True)
class BucketStats:
    low: float
    high: float
    requests: int
    judged: int
    agree: int
    in_top5: int

    @property
    def agreement(self) -> float | None:
        return self.agree / self.judged if self.judged else None

    @property
    def top5_agreement(self) -> float | None:
        return self.in_top5 / self.judged if self.judged else None


@dataclass(frozen=True, slots=True)
class ThresholdStats:
    threshold: float
    sent_share: float | None
    final_agreement: float | None


@dataclass(frozen=True, slots=True)
class Agreement:
    buckets: list[BucketStats]

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> Agreement:
        return cls(
            [
                BucketStats(
                    low=b / BUCKETS,
                    high=(b + 1) / BUCKETS,
                    requests=counts.get(f"{SEEN}:{b}", 0),
                    judged=counts.get(f"{JUDGED}:{b}", 0),
                    agree=counts.get(f"{AGREE}:{b}", 0),
                    in_top5=counts.get(f"{IN_TOP5}:{b}", 0),
                )
                for b in range(BUCKETS)
            ]
        )

    @property
    def requests(self) -> int:
        return sum(b.requests for b in self.buckets)

    @property
    def judged(self) -> int:
        return sum(b.judged for b in self.buckets)

    @property
    def agreement(self) -> float | None:
        judged = self.judged
        return sum(b.agree for b in self.buckets) / judged if judged else None

    @property
    def top5_agreement(self) -> float | None:
        judged = self.judged
        return sum(b.in_top5 for b in self.buckets) / judged if judged else None

    def at(self, threshold: float) -> ThresholdStats:
        """What `when_unsure` at this threshold would do: the share of requests it sends to the
        accurate model, and how often its final answer would match the `always` policy's (sent
        requests match by construction; kept ones as often as their bucket agreed)."""
        total = self.requests
        if not total:
            return ThresholdStats(threshold, None, None)
        sent = sum(b.requests for b in self.buckets if b.high <= threshold + 1e-9)
        kept = [b for b in self.buckets if b.high > threshold + 1e-9]
        if any(b.requests and b.agreement is None for b in kept):
            return ThresholdStats(threshold, sent / total, None)  # no data where it matters
        matched = sent + sum(b.requests * (b.agreement or 0.0) for b in kept)
        return ThresholdStats(threshold, sent / total, matched / total)

    def thresholds(self) -> list[ThresholdStats]:
        return [self.at(b / BUCKETS) for b in range(1, BUCKETS + 1)]
