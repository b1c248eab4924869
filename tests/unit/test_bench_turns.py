"""The interference ratio's spread over its turns drawn again."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.__main__ import p99_ratio_spread


def _turns(latencies: list[np.ndarray]) -> list[dict[str, Any]]:
    return [{"latencies_s": list(turn)} for turn in latencies]


def _empty(seed: int = 1, turns: int = 10, per_turn: int = 70) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(20.0, 0.0025, per_turn) for _ in range(turns)]


def test_a_slowdown_in_every_turn_spreads_nothing() -> None:
    empty = _empty()
    low, high = p99_ratio_spread(_turns(empty), _turns([1.5 * turn for turn in empty]))
    assert abs(low - 1.5) < 1e-9
    assert abs(high - 1.5) < 1e-9


def test_a_stall_in_one_turn_decides_the_ratio_but_not_its_spread() -> None:
    """Ten slow requests in one turn of ten: the run's p99 (the 7th slowest of 700) is
    theirs, while a third of the redraws leave that turn out."""
    empty = _empty()
    full = _empty(seed=2)
    full[3] = np.concatenate([full[3][:-10], np.full(10, 0.5)])
    run_ratio = np.percentile(np.concatenate(full), 99) / np.percentile(np.concatenate(empty), 99)
    low, high = p99_ratio_spread(_turns(empty), _turns(full))
    assert run_ratio > 3
    assert low < 1.25 < run_ratio <= high * 1.01
    assert p99_ratio_spread(_turns(empty), _turns(full)) == (low, high)  # the same turns, the same
