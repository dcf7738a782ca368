"""Progress of long transfers (pin, verify): a redrawn bar on a terminal, plain lines otherwise.

On a terminal one line is redrawn in place: label, bar, bytes done of total, GB/s, elapsed.
When stdout is a pipe or a file (scripts, CI logs, journald), a plain line is printed at
most once per `interval` seconds and once at the end, so logs stay short and greppable.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

from thawctl import render


class Progress:
    def __init__(
        self,
        label: str,
        out: TextIO,
        *,
        tty: bool | None = None,
        interval: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self.label = label
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.interval = interval
        self.enabled = enabled
        self._started = time.monotonic()
        # The first plain line comes after one interval: short transfers print only their result.
        self._last_line = self._started
        self._drawn = False
        self._lines = 0

    def update(self, done: int, total: int, elapsed: float | None = None) -> None:
        """Report `done` of `total` bytes; `elapsed` (seconds) from the source when it has one."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._started if elapsed is None else elapsed
        if self.tty:
            self._draw(done, total, elapsed)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._lines += 1
            self.out.write(self._text(done, total, elapsed) + "\n")
            self.out.flush()

    def finish(self, done: int, total: int, elapsed: float | None = None) -> None:
        """The last report; in plain mode only when earlier lines announced a long transfer."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._started if elapsed is None else elapsed
        if self.tty:
            self._draw(done, total, elapsed)
            self.out.write("\n")
        elif self._lines:
            self.out.write(self._text(done, total, elapsed) + "\n")
        self.out.flush()

    def abandon(self) -> None:
        """End a half-drawn terminal line, so an error message starts on its own line."""
        if self.enabled and self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False

    def _text(self, done: int, total: int, elapsed: float) -> str:
        pct = f"{100.0 * done / total:5.1f}%" if total else "  -  "
        speed = render.rate(done / elapsed) if elapsed > 0 else "-"
        return (
            f"{self.label}: {render.size(done)} of {render.size(total)} ({pct.strip()}), "
            f"{speed}, {elapsed:.1f}s"
        )

    def _draw(self, done: int, total: int, elapsed: float) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        speed = render.rate(done / elapsed) if elapsed > 0 else "- GB/s"
        tail = f" {render.size(done)}/{render.size(total)} {speed:>11} {elapsed:5.1f}s"
        head = f"{self.label} "
        bar_width = max(10, width - len(head) - len(tail) - 3)
        filled = int(bar_width * done / total) if total else 0
        bar = "█" * filled + "░" * (bar_width - filled)
        self.out.write(f"\r{head}[{bar}]{tail}"[: width + 1])
        self.out.flush()
        self._drawn = True
