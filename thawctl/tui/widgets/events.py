"""The event log: what happened in the daemon (and to the connection), newest last."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.widgets import RichLog

STYLES = {
    "pinned": "green",
    "warmed": "green",
    "restore_finished": "cyan",
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


def clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


class EventLog(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=500, wrap=False, markup=False, highlight=False, **kwargs)

    def add(self, when: float, kind: str, subject: str, message: str) -> None:
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
        subject = event.snapshot if isinstance(event.snapshot, str) else ""
        self.add(event.time, event.kind, subject, event.message)
