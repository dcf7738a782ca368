"""Gauges of the pinned and warm budgets and of host memory."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widget import Widget

from thawctl import render

# Above these shares a gauge turns yellow, then red: budgets are hard limits in thawd.
WARN, ALERT = 0.75, 0.9


class Gauge(Widget):
    """`label [████░░░░] used / total` in one line."""

    DEFAULT_CSS = "Gauge { height: 1; }"
    used: reactive[int | None] = reactive(None)
    total: reactive[int | None] = reactive(None)

    def __init__(self, label: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def render(self) -> Text:
        text = Text(f"{self.label:<7}", style="bold")
        numbers = (
            f"{render.size(self.used)}/{render.size(self.total)}"
            if self.used is not None and self.total
            else "-"
        ).rjust(20)  # "999.9 GiB/999.9 GiB" and a space: the bars line up
        width = max(4, self.size.width - len(text) - len(numbers) - 2)
        share = self.used / self.total if self.used is not None and self.total else 0.0
        filled = min(width, round(width * share))
        style = "red" if share >= ALERT else "yellow" if share >= WARN else "green"
        text.append("▕")
        text.append("█" * filled, style=style)
        text.append("░" * (width - filled), style="bright_black")
        text.append("▏")
        text.append(numbers)
        return text


class MemoryGauges(Vertical):
    status: reactive[Any] = reactive(None)

    def compose(self) -> ComposeResult:
        yield Gauge("pinned", id="gauge-pinned")
        yield Gauge("warm", id="gauge-warm")
        yield Gauge("host", id="gauge-host")

    def watch_status(self, s: Any) -> None:
        if s is None or not self.is_mounted:
            return
        values = {
            "#gauge-pinned": (s.pinned_used, s.pinned_budget),
            "#gauge-warm": (s.warm_used, s.warm_budget),
            "#gauge-host": (s.host_memory_total - s.host_memory_available, s.host_memory_total),
        }
        for selector, (used, total) in values.items():
            gauge = self.query_one(selector, Gauge)
            gauge.used, gauge.total = used, total
