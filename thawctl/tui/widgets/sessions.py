"""The sessions view (key S): who restores or freezes what now, and the latest restores with
their rates, as `thawctl sessions` prints them."""

from __future__ import annotations

from typing import Any

from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import DataTable

from thawctl.sessions import HEADERS, row


class SessionTable(DataTable[Any]):
    BINDINGS = [
        Binding("j", "cursor_down", "down", show=False),
        Binding("k", "cursor_up", "up", show=False),
        Binding("home", "scroll_top", "first", show=False),
        Binding("end", "scroll_bottom", "last", show=False),
    ]

    sessions: reactive[tuple[Any, ...]] = reactive(())

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)

    def on_mount(self) -> None:
        self.add_columns(*HEADERS)

    def watch_sessions(self, sessions: tuple[Any, ...]) -> None:
        if not self.is_mounted:
            return
        self.clear()
        for s in sessions:
            self.add_row(*row(s))
        opened = sum(s.open for s in sessions)
        self.border_title = f"sessions: {opened} open · latest {len(sessions) - opened} ended"
