"""The dashboard: header, memory gauges, GPUs, restore throughput, snapshots, events.

The screen owns the view state as reactive attributes and binds its widgets to them. One
worker (`watch_daemon`) reads the source's blocking stream in a thread and posts every item
as a message; the handlers only assign reactives, so the UI never waits on the daemon.
Actions (pin, unpin, verify, remove) run in their own workers and report by message too.
"""

from __future__ import annotations

import time
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from thawctl import render
from thawctl.tui.messages import ActionDone, ActionProgress, PoolUpdate, SourceUpdate
from thawctl.tui.screens.confirm import ConfirmScreen
from thawctl.tui.screens.help import HelpScreen
from thawctl.tui.source import Connection, Source
from thawctl.tui.widgets.events import EventLog
from thawctl.tui.widgets.gauges import MemoryGauges
from thawctl.tui.widgets.gpus import GpuList
from thawctl.tui.widgets.header import DaemonHeader
from thawctl.tui.widgets.pool import PoolTable
from thawctl.tui.widgets.sessions import SessionTable
from thawctl.tui.widgets.snapshots import SORT_NAMES, SnapshotTable, arrange
from thawctl.tui.widgets.throughput import WINDOW, ThroughputPlot

# Progress lines from a pin arrive every ~0.2 s; the activity bar needs no more than that.
PROGRESS_PERIOD_S = 0.1
# Lines the event log keeps however many snapshots there are (fewer below 24 lines), and the
# table's least height (its header and one row inside the border, and the empty message).
EVENTS_MIN = 5
EVENTS_MIN_SHORT = 3
TABLE_MIN = 5


class MainScreen(Screen[None]):
    BINDINGS = [
        Binding("p", "pin", "pin"),
        Binding("w", "warm", "warm", show=False),
        Binding("u", "unpin", "unpin"),
        Binding("v", "verify", "verify"),
        Binding("d", "remove", "remove"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("s", "sort", "sort"),
        Binding("S", "sessions", "sessions", show=False),
        Binding("P", "pool", "pool", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "app.quit", "quit"),
    ]

    # View state: the latest records from thaw.client, and what the operator chose to see.
    status: reactive[Any] = reactive(None)
    connection: reactive[Any] = reactive(None)
    snapshots: reactive[tuple[Any, ...]] = reactive(())
    sessions: reactive[tuple[Any, ...]] = reactive(())
    samples: reactive[tuple[float, ...]] = reactive(())
    now: reactive[float] = reactive(0.0)
    interval_s: reactive[float] = reactive(1.0)
    filter_text: reactive[str] = reactive("")
    sort_key: reactive[str] = reactive("name")
    activity: reactive[str] = reactive("")
    pool: reactive[Any] = reactive(None)

    def __init__(self, source: Source, interval_s: float = 1.0, serve_socket: str = "") -> None:
        super().__init__()
        self.source = source
        self.serve_socket = serve_socket  # a thawctl serve's admin socket, for the pool view
        self.set_reactive(MainScreen.interval_s, interval_s)

    def compose(self) -> ComposeResult:
        yield DaemonHeader(id="header").data_bind(MainScreen.status, MainScreen.connection)
        with Horizontal(id="top"):
            yield MemoryGauges(id="gauges").data_bind(MainScreen.status)
            yield GpuList(id="gpus").data_bind(MainScreen.status)
        yield ThroughputPlot(id="throughput").data_bind(MainScreen.samples, MainScreen.interval_s)
        table = SnapshotTable(id="snapshots").data_bind(
            MainScreen.snapshots, MainScreen.filter_text, MainScreen.sort_key, MainScreen.now
        )
        yield table
        yield SessionTable(id="sessions").data_bind(MainScreen.sessions)
        yield PoolTable(id="pool").data_bind(MainScreen.pool)
        yield Input(placeholder="filter: name, path, tier, label…", id="filter")
        yield Static("", id="activity")
        yield EventLog(id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#gauges").border_title = "memory"
        self.query_one("#gpus").border_title = "gpus"
        self.query_one("#events").border_title = "events"
        self._update_titles()
        self.query_one(SnapshotTable).focus()
        self.watch_daemon()
        if self.serve_socket:
            self.watch_pool()

    # --- the one watch worker ---------------------------------------------------------------

    @work(thread=True, exclusive=True, group="watch", exit_on_error=False)
    def watch_daemon(self) -> None:
        """Consume the source's stream (blocking, in a thread) and post every item."""
        for item in self.source.stream():
            self.post_message(SourceUpdate(item))

    @work(thread=True, exclusive=True, group="pool", exit_on_error=False)
    def watch_pool(self) -> None:
        """Poll the serve pool's admin socket each interval (in a thread); a server not
        answering leaves the last view in place, titled as unreachable."""
        from textual.worker import get_current_worker

        from thawctl.serve.status import fetch

        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                self.post_message(PoolUpdate(fetch(self.serve_socket)))
            except Exception as e:
                self.post_message(PoolUpdate(None, f"{type(e).__name__}: {e}"))
            deadline = time.monotonic() + self.interval_s
            while not worker.is_cancelled and time.monotonic() < deadline:
                time.sleep(0.05)  # short naps: quitting the dashboard never waits a period

    @on(PoolUpdate)
    def _pool_received(self, message: PoolUpdate) -> None:
        if message.pool is not None:
            self.pool = message.pool
        else:
            table = self.query_one(PoolTable)
            table.border_title = f"pool: {self.serve_socket} unreachable ({message.error})"

    def on_resize(self) -> None:
        # Below 24 lines the snapshot table matters most: the plot goes, the log shrinks.
        self.set_class(self.size.height < 24, "-short")
        self._fit_heights()

    def _fit_heights(self) -> None:
        """The table as tall as its rows (none left empty), the event log gets the rest; the
        log keeps EVENTS_MIN lines however many rows there are."""
        if not self.is_mounted:
            return
        table, log = self.query_one(SnapshotTable), self.query_one(EventLog)
        others = sum(
            w.outer_size.height for w in self.children if w.display and w not in (table, log)
        )
        room = self.size.height - others
        rows = len(arrange(self.snapshots, self.filter_text, self.sort_key))
        events_min = EVENTS_MIN_SHORT if self.has_class("-short") else EVENTS_MIN
        # + 3: the header row and the border above and below; a narrow terminal's table
        # scrolls sideways, and its scrollbar takes a line.
        wanted = rows + 3
        if table.show_horizontal_scrollbar:
            wanted += table.styles.scrollbar_size_horizontal
        height = max(TABLE_MIN, min(wanted, room - events_min))
        if table.styles.height is None or table.styles.height.value != height:
            table.styles.height = height

    def on_unmount(self) -> None:
        self.source.stop()

    @on(SourceUpdate)
    def _received(self, message: SourceUpdate) -> None:
        from thaw.daemon.records import Event, Metrics

        item = message.item
        if isinstance(item, Metrics):
            self.status = item.status
            self.snapshots = item.snapshots
            self.sessions = item.sessions
            self.now = item.time
            self.samples = (*self.samples, item.restore_bytes_per_s)[-WINDOW:]
        elif isinstance(item, Event):
            self.query_one(EventLog).add_event(item)
        elif isinstance(item, Connection):
            previous = self.connection
            self.connection = item
            if item.state == "connected":
                self.query_one(EventLog).add(
                    item.time, "connection", "", f"connected: {item.detail}"
                )
            elif item.state == "reconnecting" and (
                previous is None or previous.state != "reconnecting"
            ):
                self.query_one(EventLog).add(
                    item.time, "connection", "", f"lost thawd ({item.detail}); reconnecting"
                )

    # --- view state -------------------------------------------------------------------------

    def watch_connection(self, connection: Any) -> None:
        self.set_class(connection is not None and connection.state != "connected", "-stale")

    def watch_activity(self, text: str) -> None:
        self.query_one("#activity", Static).update(text)
        self.set_class(bool(text), "-busy")
        self.call_after_refresh(self._fit_heights)

    def watch_filter_text(self) -> None:
        self._update_titles()
        self.call_after_refresh(self._fit_heights)

    def watch_sort_key(self) -> None:
        self._update_titles()

    def watch_snapshots(self) -> None:
        self._update_titles()
        self.call_after_refresh(self._fit_heights)

    def _update_titles(self) -> None:
        table = self.query_one(SnapshotTable)
        shown = len(arrange(self.snapshots, self.filter_text, self.sort_key))
        title = f"snapshots {shown}/{len(self.snapshots)} · sort: {self.sort_key}"
        if self.filter_text:
            title += f" · filter: {self.filter_text}"
        table.border_title = title

    # --- keys -------------------------------------------------------------------------------

    def _selected(self) -> Any:
        name = self.query_one(SnapshotTable).selected
        if name is None:
            self.notify("no snapshot selected", severity="warning")
            return None
        return next((r for r in self.snapshots if r.name == name), None)

    def action_pool(self) -> None:
        """Show the serve pool in the snapshot table's place, or the snapshots again."""
        self._show_instead("-pool", PoolTable)

    def action_sessions(self) -> None:
        """Show the sessions in the snapshot table's place, or the snapshots again."""
        self._show_instead("-sessions", SessionTable)

    def _show_instead(self, view: str, table: type[Any]) -> None:
        """Toggle `view` (a screen class, thawtop.tcss) in the snapshot table's place; at most
        one such view shows at a time."""
        showing = not self.has_class(view)
        for other in ("-pool", "-sessions"):
            self.set_class(False, other)
        self.set_class(showing, view)
        snapshots = self.query_one(SnapshotTable)
        widget = self.query_one(table)
        widget.styles.height = snapshots.styles.height
        (widget if showing else snapshots).focus()

    def action_pin(self) -> None:
        record = self._selected()
        if record is not None:
            self.run_pin(record.name, warm=False)

    def action_warm(self) -> None:
        record = self._selected()
        if record is not None:
            self.run_pin(record.name, warm=True)

    def action_unpin(self) -> None:
        record = self._selected()
        if record is None:
            return
        name = record.name
        if not record.clients:
            self.run_unpin(name)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_unpin(name)

        # thawd refuses while restores are open, but a snapshot in use is one an engine is
        # loading from right now: unpinning it makes its next restores read the file.
        self.app.push_screen(
            ConfirmScreen(
                f"Snapshot {name!r} is in use: {record.clients} restore(s) open.\n"
                "Unpin it? thawd refuses while they run; later restores read the file.",
                verb="Unpin",
            ),
            answered,
        )

    def action_verify(self) -> None:
        record = self._selected()
        if record is not None:
            self.run_verify(record.name)

    def action_remove(self) -> None:
        record = self._selected()
        if record is None:
            return
        name = record.name

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_remove(name)

        self.app.push_screen(
            ConfirmScreen(f"Remove snapshot {name!r} from thawd?\nThe file {record.path} stays."),
            answered,
        )

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.filter_text
        self.add_class("-filtering")
        box.focus()
        self.call_after_refresh(self._fit_heights)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.remove_class("-filtering")
        self.query_one(SnapshotTable).focus()
        self.call_after_refresh(self._fit_heights)

    def key_escape(self) -> None:
        if self.has_class("-filtering"):
            self.query_one("#filter", Input).value = ""
            self.filter_text = ""
            self._filter_done()

    def action_sort(self) -> None:
        self.sort_key = SORT_NAMES[(SORT_NAMES.index(self.sort_key) + 1) % len(SORT_NAMES)]

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    # --- action workers ---------------------------------------------------------------------

    @work(thread=True, group="actions", exit_on_error=False)
    def run_pin(self, name: str, warm: bool) -> None:
        verb = "warming" if warm else "pinning"
        last = [0.0]

        def progress(p: Any) -> None:
            now = time.monotonic()
            if p.done or now - last[0] >= PROGRESS_PERIOD_S:
                last[0] = now
                pct = 100.0 * p.done_bytes / p.total_bytes if p.total_bytes else 100.0
                speed = render.rate(p.done_bytes / p.elapsed_s if p.elapsed_s else None)
                done = f"{render.size(p.done_bytes)}/{render.size(p.total_bytes)}"
                self.post_message(ActionProgress(f"{verb} {name}: {done} {pct:.0f}% {speed}"))

        self.post_message(ActionProgress(f"{verb} {name}…"))
        self._report(
            lambda: self.source.pin(name, progress, warm=warm),
            lambda r: f"{name} is {r.tier} (checksums {r.checksum_state})",
        )

    @work(thread=True, group="actions", exit_on_error=False)
    def run_unpin(self, name: str) -> None:
        self.post_message(ActionProgress(f"unpinning {name}…"))
        self._report(lambda: self.source.unpin(name), lambda r: f"{name} is {r.tier}")

    @work(thread=True, group="actions", exit_on_error=False)
    def run_remove(self, name: str) -> None:
        self.post_message(ActionProgress(f"removing {name}…"))
        self._report(lambda: self.source.remove(name), lambda _: f"{name} removed")

    @work(thread=True, group="actions", exit_on_error=False)
    def run_verify(self, name: str) -> None:
        # thawd hashes where the bytes are and logs the outcome as its own event.
        self.post_message(ActionProgress(f"thawd is verifying {name}…"))
        self._report(
            lambda: self.source.verify(name),
            lambda r: f"{name}: verified {render.size(r.bytes)} from the {r.source}",
        )

    def _report(self, call: Any, describe: Any, log: bool = False) -> None:
        """Run an action in this worker thread; post its one-line outcome, never raise."""
        from thawctl import exitcodes

        try:
            text = describe(call())
        except Exception as e:  # shown to the operator, like the CLI's one-line errors
            _, hint = exitcodes.classify(e)
            self.post_message(ActionDone(exitcodes.message(e, hint), error=True))
            return
        self.post_message(ActionDone(text, log=log))

    @on(ActionProgress)
    def _progress(self, message: ActionProgress) -> None:
        self.activity = message.text

    @on(ActionDone)
    def _done(self, message: ActionDone) -> None:
        self.activity = ""
        if message.error or message.log:
            kind = "error" if message.error else "done"
            self.query_one(EventLog).add(time.time(), kind, "", message.text)
        self.notify(
            message.text,
            severity="error" if message.error else "information",
            timeout=6 if message.error else 3,
        )
