"""The top line: daemon version, pid, uptime, pool, and the state of the connection."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from thawctl import render


class DaemonHeader(Widget):
    status: reactive[Any] = reactive(None)
    connection: reactive[Any] = reactive(None)

    def render(self) -> Text:
        s = self.status
        left = Text()
        left.append(" thawd ", style="bold reverse")
        if s is not None:
            left.append(
                f" {s.version} · pid {s.pid} · up {render.duration(s.uptime_s)} · "
                f"{s.pool_kind} pool"
            )
            if not s.memory_locked:
                left.append(" · not memory-locked", style="bold yellow")
        state = self.connection.state if self.connection is not None else "connecting"
        right = {
            "connected": Text("● connected", style="bold green"),
            "reconnecting": Text("◌ reconnecting…", style="bold yellow"),
        }.get(state, Text("◌ connecting…", style="yellow"))
        width = self.size.width
        gap = max(1, width - left.cell_len - right.cell_len - 1)
        return Text.assemble(left, " " * gap, right)
