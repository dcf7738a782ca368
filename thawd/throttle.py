"""Log lines that a client can cause, bounded: a flood of bad requests must not flood the log
(journald rate-limits per service and would drop the lines that matter)."""

from __future__ import annotations

import logging
import time


class Throttle:
    """At most `burst` lines per `period` seconds; the lines dropped meanwhile are counted and
    reported on the next line that passes."""

    def __init__(self, burst: int = 20, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def log(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        now = time.monotonic()
        if now - self._window >= self.period:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > self.burst:
            self._dropped += 1
            return
        if self._dropped:
            msg += f" ({self._dropped} similar lines dropped)"
            self._dropped = 0
        logger.log(level, msg, *args, exc_info=exc_info)
