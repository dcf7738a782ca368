"""Restore throughput of the whole daemon over the last minutes: a sparkline and its numbers."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Sparkline

from thawctl import render

# Samples kept: one per metrics period (1 s by default), so 3 minutes of history.
WINDOW = 180


class ThroughputLabel(Widget):
    DEFAULT_CSS = "ThroughputLabel { height: 1; }"
    samples: reactive[tuple[float, ...]] = reactive(())
    interval_s: reactive[float] = reactive(1.0)

    def render(self) -> Text:
        samples = self.samples
        now = samples[-1] if samples else None
        peak = max(samples) if samples else None
        minutes = len(samples) * self.interval_s / 60
        text = Text("restores ", style="bold")
        text.append(render.rate(now), style="bold cyan")
        text.append(f" now · peak {render.rate(peak)} · last {minutes:.0f} min", style="dim")
        return text


class ThroughputPlot(Vertical):
    samples: reactive[tuple[float, ...]] = reactive(())
    interval_s: reactive[float] = reactive(1.0)

    def compose(self) -> ComposeResult:
        yield ThroughputLabel().data_bind(ThroughputPlot.samples, ThroughputPlot.interval_s)
        yield Sparkline([], summary_function=max, id="sparkline")

    def watch_samples(self, samples: tuple[float, ...]) -> None:
        if self.is_mounted:
            # Left-padded with zeros so the plot scrolls in from the right at a fixed scale.
            padded = [0.0] * (WINDOW - len(samples)) + list(samples)
            self.query_one(Sparkline).data = padded
