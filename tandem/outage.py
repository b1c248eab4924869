"""Logging a fault that a loop meets again and again: when it starts, while it lasts, its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REMIND_S = 60.0


class Outage:
    """One kind of repeated fault, such as the queue refusing a worker's claims.

    A loop that retries every second had logged a line a second for as long as Redis was
    away (and a proxy logged nothing at all). This logs the first fault of a run, one reminder
    every `remind_s` while it lasts, and its end.
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        remind_s: float = REMIND_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._what, self._level = log, what, level
        self._remind_s, self._clock = remind_s, clock
        self._since: float | None = None
        self._next_reminder = 0.0

    def failed(self, reason: str, *, exc_info: bool = False) -> None:
        now = self._clock()
        if self._since is None:
            self._since, self._next_reminder = now, now + self._remind_s
            self._log.log(self._level, "%s failed: %s", self._what, reason, exc_info=exc_info)
        elif now >= self._next_reminder:
            self._next_reminder = now + self._remind_s
            since = now - self._since
            self._log.log(
                self._level, "%s still failing after %.0f s: %s", self._what, since, reason
            )

    def ended(self) -> None:
        if self._since is not None:
            since, self._since = self._clock() - self._since, None
            self._log.info("%s recovered after %.0f s", self._what, since)
