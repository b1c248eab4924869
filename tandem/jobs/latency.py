"""How long clients waited for the accurate answer: from a job's acceptance to its answer,
a histogram that every worker adds to. It lives in the job store as plain counters, beside
the agreement tallies, so that every proxy's /metrics shows the same one, across restarts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Upper bounds in seconds: a job answered at once by an idle worker takes tens of
# milliseconds; one behind a backlog, minutes.
BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Counter names: each bucket's own count (not cumulative) under its bound, and the sum.
BUCKET = "answered_within:"
SUM_MS = "answered_ms"


def _name(bound: float) -> str:
    return f"{BUCKET}{'+Inf' if math.isinf(bound) else repr(bound)}"


def answered_counts(waited_s: float) -> dict[str, int]:
    """Counters for one job whose accurate answer came `waited_s` after it was accepted. The
    two times come from two clocks (a proxy's and a worker's), so a negative wait, a worker's
    clock behind the proxy's, counts as none."""
    waited_s = max(waited_s, 0.0)
    bound = next((b for b in BOUNDS if waited_s <= b), math.inf)
    return {_name(bound): 1, SUM_MS: round(waited_s * 1000.0)}


@dataclass(frozen=True, slots=True)
class AnswerLatency:
    """The histogram as Prometheus shows it: cumulative counts by upper bound, and the sum."""

    buckets: tuple[tuple[str, int], ...]
    sum_s: float

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> AnswerLatency:
        running, buckets = 0, []
        for bound in (*BOUNDS, math.inf):
            running += counts.get(_name(bound), 0)
            buckets.append((_name(bound).removeprefix(BUCKET), running))
        return cls(tuple(buckets), counts.get(SUM_MS, 0) / 1000.0)

    @property
    def count(self) -> int:
        return self.buckets[-1][1]
