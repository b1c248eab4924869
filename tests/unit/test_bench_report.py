"""The bench report's reading of the floor's scan."""

from __future__ import annotations

from bench.report import _side_by_side


def _setting(batch: int, threads: int, callers: int, images_per_s: float) -> dict[str, float]:
    return {"batch": batch, "threads": threads, "callers": callers, "images_per_s": images_per_s}


def test_callers_side_by_side_are_compared_with_one_at_batch_1() -> None:
    scan = [
        _setting(1, 1, 1, 60.0),
        _setting(1, 1, 2, 90.0),
        _setting(1, 2, 1, 200.0),  # threads per run are another question
        _setting(4, 1, 2, 500.0),  # and so are batches
    ]
    (_, line) = _side_by_side({"fast": scan})
    assert line.startswith("Single-threaded callers side by side against one, batch 1: ")
    assert "fast 1.50 times (2 callers)." in line


def test_a_scan_without_callers_side_by_side_says_nothing() -> None:
    assert _side_by_side({"fast": [_setting(1, 1, 1, 60.0), _setting(1, 2, 1, 90.0)]}) == []
