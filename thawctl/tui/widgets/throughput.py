"""Restore throughput of the whole daemon over the last minutes: a sparkline and its numbers.

The sparkline scales its bars from the lowest sample to the highest; the samples are padded
with zeros, so its scale runs from 0 to the window's peak, which the axis to its left says."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
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


class ThroughputAxis(Widget):
    """The plot's scale: its top is the window's peak, its bottom 0."""

    DEFAULT_CSS = "ThroughputAxis { width: 11; height: 2; color: $text-muted; }"
    samples: reactive[tuple[float, ...]] = reactive(())

    def render(self) -> Text:
        peak = max(self.samples, default=0.0)
        top = f"{peak / 1e9:.1f} GB/s" if peak else "0 GB/s"
        return Text(f"{top:>9} ┤\n{'0':>9} ┤", no_wrap=True)


class ThroughputPlot(Vertical):
    samples: reactive[tuple[float, ...]] = reactive(())
    interval_s: reactive[float] = reactive(1.0)

    def compose(self) -> ComposeResult:
        yield ThroughputLabel().data_bind(ThroughputPlot.samples, ThroughputPlot.interval_s)
        with Horizontal(id="plot"):
            yield ThroughputAxis().data_bind(ThroughputPlot.samples)
            yield Sparkline([], summary_function=max, id="sparkline")

    def watch_samples(self, samples: tuple[float, ...]) -> None:
        if self.is_mounted:
            # Left-padded with zeros so the plot scrolls in from the right at a fixed scale.
            padded = [0.0] * (WINDOW - len(samples)) + list(samples)
            self.query_one(Sparkline).data = padded
