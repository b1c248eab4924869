from __future__ import annotations

import logging

import pytest

from tandem.outage import Outage

log = logging.getLogger("tests.outage")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(record.levelname, record.getMessage()) for record in caplog.records]


def test_a_run_of_faults_logs_its_start_a_reminder_a_minute_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tests.outage")
    clock = Clock()
    outage = Outage(log, "claiming jobs", clock=clock)
    outage.ended()  # nothing had failed
    for _ in range(150):  # a retry a second for two and a half minutes
        outage.failed("Redis is unavailable")
        clock.now += 1
    outage.ended()
    outage.ended()
    assert _lines(caplog) == [
        ("WARNING", "claiming jobs failed: Redis is unavailable"),
        ("WARNING", "claiming jobs still failing after 60 s: Redis is unavailable"),
        ("WARNING", "claiming jobs still failing after 120 s: Redis is unavailable"),
        ("INFO", "claiming jobs recovered after 150 s"),
    ]


def test_the_next_run_of_faults_is_logged_afresh(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.outage")
    clock = Clock()
    outage = Outage(log, "listening", level=logging.ERROR, clock=clock)
    outage.failed("first")
    outage.ended()
    clock.now += 5
    outage.failed("second", exc_info=True)
    assert _lines(caplog) == [
        ("ERROR", "listening failed: first"),
        ("INFO", "listening recovered after 0 s"),
        ("ERROR", "listening failed: second"),
    ]
