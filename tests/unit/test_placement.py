"""Placing a lone call's threads: one CPU each, the caller's only for the length of a run."""

from __future__ import annotations

import os

import pytest

from tandem.runtime import placement
from tandem.runtime.placement import Placement

MINE = frozenset(os.sched_getaffinity(0))


def test_each_pool_thread_gets_a_cpu_and_the_caller_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda _: {6, 2, 4, 8})
    every = Placement.for_threads(4)
    assert every == Placement(frozenset({8}), (2, 4, 6))
    assert every.affinities == "3;5;7"  # ONNX Runtime counts processors from 1
    assert Placement.for_threads(3) is None  # a CPU to spare: left to the scheduler
    assert Placement.for_threads(5) is None  # more threads than CPUs: nothing is pinned
    assert Placement.for_threads(1) is None  # one thread needs no placing
    assert Placement.for_threads(0) is None


def test_the_caller_is_pinned_inside_and_set_free_after() -> None:
    first = min(MINE)
    with Placement(frozenset({first}), ()).caller_pinned():
        assert os.sched_getaffinity(0) == {first}
    assert os.sched_getaffinity(0) == MINE


def test_the_caller_is_set_free_when_the_run_fails() -> None:
    first = min(MINE)
    with pytest.raises(ZeroDivisionError), Placement(frozenset({first}), ()).caller_pinned():
        _ = 1 / 0
    assert os.sched_getaffinity(0) == MINE


def test_a_cpu_the_process_may_no_longer_use_leaves_the_caller_where_it_was() -> None:
    ran = False
    with Placement(frozenset({max(MINE) + 4096}), ()).caller_pinned():
        assert os.sched_getaffinity(0) == MINE
        ran = True
    assert ran
    assert os.sched_getaffinity(0) == MINE


def test_a_caller_that_cannot_be_set_free_again_still_gets_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[set[int]] = []

    def refuse_the_second(_: int, cpus: set[int]) -> None:
        calls.append(set(cpus))
        if len(calls) > 1:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(placement.os, "sched_setaffinity", refuse_the_second)
    with Placement(frozenset({min(MINE)}), ()).caller_pinned():
        answer = 42
    assert answer == 42
    assert calls == [{min(MINE)}, set(MINE)]
