"""The pool view (key P, with `thawctl top --serve SOCKET`): a `thawctl serve`'s slots, the
model each holds, requests in flight, queue depth per model, swaps per minute."""

from __future__ import annotations

from typing import Any

from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import DataTable

HEADERS = ("SLOT", "STATE", "MODEL", "IN FLIGHT", "QUEUED", "SWAPS")


class PoolTable(DataTable[Any]):
    BINDINGS = [
        Binding("j", "cursor_down", "down", show=False),
        Binding("k", "cursor_up", "up", show=False),
    ]

    pool: reactive[Any] = reactive(None)  # a thawctl.serve.status.PoolView, or None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)

    def on_mount(self) -> None:
        self.add_columns(*HEADERS)
        self.border_title = "pool: not connected (thawctl top --serve SOCKET)"

    def watch_pool(self, pool: Any) -> None:
        if not self.is_mounted or pool is None:
            return
        self.clear()
        for s in pool.slots:
            queued = pool.queue.get(s.model, 0) if s.model else 0
            self.add_row(str(s.slot), s.state, s.model or "-", str(s.in_flight), str(queued),
                         str(s.swaps))  # fmt: skip
        waiting = sum(pool.queue.values())
        self.border_title = (f"pool: {len(pool.slots)} slots · {waiting} queued · "
                             f"{pool.swaps_per_minute} swaps/min")  # fmt: skip
