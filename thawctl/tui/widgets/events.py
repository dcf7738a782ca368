"""The event log: what happened in the daemon (and to the connection), newest last.

Under load thawd finishes restores many times a second; one line each would push the pins and
failures out of sight at once. Finished restores are gathered per second of the daemon's clock
into one line ("38 restores, 608.0 GiB at 53.2 GB/s"); every other event (pins, failures,
failed restores) gets its own line, after the restores before it.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from rich.text import Text
from textual.widgets import RichLog

from thawctl import render

STYLES = {
    "pinned": "green",
    "warmed": "green",
    "restore_finished": "cyan",
    "restores": "cyan",
    "freeze_written": "cyan",
    "freeze_committed": "cyan",
    "registered": "blue",
    "unregistered": "blue",
    "unpinned": "blue",
    "demoted": "yellow",
    "stopping": "yellow",
    "restore_failed": "red",
    "freeze_failed": "red",
    "pin_failed": "red",
    "connection": "magenta",
    "error": "red",
    "done": "green",
}
# The events that shows up every second under load are the least interesting.
QUIET = {"restore_started"}
GATHERED = {"restore_finished"}
# A second's restores are written once a later event shows the second is over, or after this
# long with none (the daemon may go quiet).
GATHER_S = 1.0


def clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


class EventLog(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=500, wrap=False, markup=False, highlight=False, **kwargs)
        self._restores: list[Any] = []  # finished restores of the second being gathered
        self._gathering_since = 0.0  # monotonic time the first of them came

    def on_mount(self) -> None:
        self.set_interval(GATHER_S / 2, self._flush_if_quiet)

    def add(self, when: float, kind: str, subject: str, message: str) -> None:
        """One line; the restores gathered so far go first, so the log stays in order."""
        self.flush()
        line = Text(clock(when) + " ", style="dim")
        line.append(f"{kind:<16}", style=STYLES.get(kind, ""))
        if subject:
            line.append(f" {subject}", style="bold")
        if message:
            line.append(f" {message}")
        self.write(line)

    def add_event(self, event: Any) -> None:
        if event.kind in QUIET:
            return
        if event.kind in GATHERED:
            if self._restores and int(event.time) != int(self._restores[0].time):
                self.flush()
            if not self._restores:
                self._gathering_since = time.monotonic()
            self._restores.append(event)
            return
        self._write_event(event)

    def flush(self) -> None:
        """Write the gathered restores: one as it came, several as one line."""
        restores, self._restores = self._restores, []
        if len(restores) == 1:
            self._write_event(restores[0])
        elif restores:
            self.add(restores[0].time, "restores", _names(restores), _summary(restores))

    def _flush_if_quiet(self) -> None:
        if self._restores and time.monotonic() - self._gathering_since >= GATHER_S:
            self.flush()

    def _write_event(self, event: Any) -> None:
        subject = event.snapshot if isinstance(event.snapshot, str) else ""
        self.add(event.time, event.kind, subject, event.message)


def _names(restores: list[Any]) -> str:
    """`llama-8b (38), qwen-32b (2)`: which snapshots, most restored first."""
    counts = collections.Counter(
        r.snapshot if isinstance(r.snapshot, str) else "?" for r in restores
    )
    return ", ".join(f"{name} ({n})" if n > 1 else name for name, n in counts.most_common())


def _summary(restores: list[Any]) -> str:
    """`40 restores, 640.0 GiB at 53.2 GB/s`: the rate is their bytes over their summed
    durations, each restore's own speed weighted by its size (not the second's throughput,
    which the plot above shows)."""
    total = sum(r.bytes for r in restores)
    seconds = sum(r.duration_s for r in restores)
    text = f"{len(restores)} restores, {render.size(total)}"
    return text + (f" at {render.rate(total / seconds)}" if seconds > 0 else "")
