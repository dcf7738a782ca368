"""The GPUs thawd sees: index, name, memory, PCIe link."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from thawctl import render
from thawctl.schema import known


class GpuList(Widget):
    status: reactive[Any] = reactive(None)

    def render(self) -> Text:
        s = self.status
        if s is None:
            return Text("-", style="dim")
        if not s.gpus:
            return Text("none: restores copy into CPU memory", style="dim")
        out = Text(no_wrap=True, overflow="ellipsis")
        for i, g in enumerate(s.gpus):
            if i:
                out.append("\n")
            out.append(f"{g.index} ", style="bold")
            out.append(f"{g.name.removeprefix('NVIDIA ')} ")
            used = known(g.memory_used)
            # Whole GiB: "141 GiB" keeps a GPU on one line of a narrow box.
            memory = f"{g.memory_total / (1 << 30):.0f} GiB"
            out.append(
                f"{render.size(used)}/{memory}" if used is not None else memory, style="cyan"
            )
            link = known(g.link)
            if link:
                out.append(f" {link}", style="dim")
        return out
