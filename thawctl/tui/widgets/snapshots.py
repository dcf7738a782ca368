"""The table of registered snapshots, filtered and sorted by view state the screen owns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import DataTable

from thawctl import render
from thawctl.schema import known

# Fixed widths fit the longest value of each column ("unverified", "512.0 GiB", "59m 59s").
# NAME and PATH share the rest (column_widths): 12 characters of name and no path at 80
# columns; the names' own width and the path beside them from about 110.
FIXED_COLUMNS = (
    ("TIER", 7),
    ("SIZE", 9),
    ("RES", 4),
    ("CLI", 3),
    ("RESTORES", 8),
    ("LAST", 7),
    ("CHECKSUMS", 10),
)
NAME_MIN = 8
PATH_MIN = 16  # narrower than this a path says nothing: the column is left out
TIER_RANK = {"pinned": 2, "warm": 1, "cold": 0}
TIER_STYLE = {"pinned": "bold green", "warm": "yellow", "cold": "dim"}
CHECKSUM_STYLE = {"verified": "green", "corrupt": "bold red", "unverified": "dim"}


# Sort orders the `s` key cycles through: (name, key, descending).
SORTS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("name", lambda r: r.name, False),
    ("tier", lambda r: (TIER_RANK.get(r.tier, 0), r.name), True),
    ("size", lambda r: r.size_bytes, True),
    ("restores", lambda r: r.restores, True),
    ("last restore", lambda r: known(r.last_used) or 0.0, True),
)
SORT_NAMES = tuple(name for name, _, _ in SORTS)


def matches(record: Any, needle: str) -> bool:
    """Case-insensitive substring of name, path, tier, checksum state or a KEY=VALUE label."""
    if not needle:
        return True
    needle = needle.lower()
    haystack = [record.name, record.path, record.tier, record.checksum_state]
    haystack += [f"{k}={v}" for k, v in record.labels.items()]
    return any(needle in h.lower() for h in haystack)


def arrange(records: Sequence[Any], needle: str, sort: str) -> list[Any]:
    _, key, descending = next(s for s in SORTS if s[0] == sort)
    return sorted((r for r in records if matches(r, needle)), key=key, reverse=descending)


def column_widths(width: int, longest_name: int, padding: int) -> tuple[int, int]:
    """(NAME, PATH) widths for a table `width` cells wide inside; PATH 0: no PATH column.

    The names come first: they get what the longest needs (at least NAME_MIN), the path the
    rest; where that leaves the path less than PATH_MIN, there is no PATH column and the names
    get all of it."""
    fixed = sum(w for _, w in FIXED_COLUMNS) + 2 * padding * (len(FIXED_COLUMNS) + 1)
    room = width - fixed
    name = max(NAME_MIN, min(longest_name, room))
    path = room - name - 2 * padding
    if path < PATH_MIN:
        return max(NAME_MIN, room), 0
    return name, path


def tail(text: str, width: int) -> str:
    """The end of `text` in `width` cells: a path keeps its file name, losing its start."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


class SnapshotTable(DataTable[Any]):
    # vi keys and Home/End move the row cursor (DataTable's Home/End scroll sideways).
    BINDINGS = [
        Binding("j", "cursor_down", "down", show=False),
        Binding("k", "cursor_up", "up", show=False),
        Binding("home", "scroll_top", "first", show=False),
        Binding("end", "scroll_bottom", "last", show=False),
    ]

    snapshots: reactive[tuple[Any, ...]] = reactive(())
    filter_text: reactive[str] = reactive("")
    sort_key: reactive[str] = reactive("name")
    now: reactive[float] = reactive(0.0)  # the daemon's clock at the last metrics

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._widths = (0, 0)  # (NAME, PATH) as laid out; PATH 0: no PATH column
        self._pending = False

    def on_mount(self) -> None:
        self._rebuild()

    def on_resize(self) -> None:
        self._rebuild()

    def _fit_columns(self) -> bool:
        """Lay the columns out anew if the width there is or the names there are call for
        other widths; True when it did (the rows are then gone)."""
        longest = max((len(r.name) for r in self.snapshots), default=0)
        # 2: the vertical scrollbar, when the table overflows.
        width = self.scrollable_content_region.width - 2
        widths = column_widths(width, max(longest, len("NAME")), self.cell_padding)
        if widths == self._widths and self.columns:
            return False
        self._widths = widths
        name, path = widths
        self.clear(columns=True)
        self.add_column("NAME", key="name", width=name)
        for label, fixed in FIXED_COLUMNS:
            self.add_column(label, key=label.lower(), width=fixed)
        if path:
            self.add_column("PATH", key="path", width=path)
        return True

    # Several of these change together (each metrics tick sets `now` and usually
    # `snapshots`): one rebuild after the batch, not one per attribute.
    def watch_snapshots(self) -> None:
        self._schedule_rebuild()

    def watch_filter_text(self) -> None:
        self._schedule_rebuild()

    def watch_sort_key(self) -> None:
        self._schedule_rebuild()

    def watch_now(self) -> None:
        self._schedule_rebuild()  # the LAST column counts from the daemon's clock

    def _schedule_rebuild(self) -> None:
        if not self._pending:
            self._pending = True
            self.call_later(self._rebuild)

    @property
    def selected(self) -> str | None:
        """The name of the snapshot under the cursor, or None in an empty table."""
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # the cursor is past a row that just went away
            return None
        return str(key.value) if key.value is not None else None

    def _rebuild(self) -> None:
        self._pending = False
        if not self.is_mounted:
            return
        keep = self.selected
        self._fit_columns()
        rows = arrange(self.snapshots, self.filter_text, self.sort_key)
        self.clear()
        for r in rows:
            self.add_row(*self._cells(r), key=r.name)
        if keep is not None:
            names = [r.name for r in rows]
            if keep in names:
                self.move_cursor(row=names.index(keep), animate=False)

    def _cells(self, r: Any) -> list[Any]:
        last = known(r.last_used)
        resident = render.percent(r.resident_bytes, r.size_bytes)
        name = Text(r.name, style="bold red" if r.error else "")
        # An arrow: the operator wants it higher (being pinned) or lower (demotable) than it is.
        rank, wanted = TIER_RANK.get(r.tier, 0), TIER_RANK.get(r.wanted_tier, 0)
        tier = r.tier + ("↑" if wanted > rank else "↓" if wanted < rank else "")
        return [
            name,
            Text(tier, style=TIER_STYLE.get(r.tier, "")),
            Text(render.size(r.size_bytes), justify="right"),
            Text(resident, justify="right"),
            Text(str(r.clients), justify="right"),
            Text(str(r.restores), justify="right"),
            Text(
                render.ago(last, self.now).removesuffix(" ago") if last else "never",
                style="" if last else "dim",
            ),
            Text(r.checksum_state, style=CHECKSUM_STYLE.get(r.checksum_state, "")),
        ] + ([Text(tail(r.path, self._widths[1]), style="dim")] if self._widths[1] else [])
