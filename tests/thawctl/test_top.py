"""`thawctl top` through App.run_test() and Pilot against a real thawd (pin from the table,
filter, sort, remove, verify, a daemon restart), and an SVG snapshot of the main screen at
80x24 with fixed records (no clocks)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from thawctl_testlib import corrupt_payload, random_tensors, write_snapshot

import thaw
from thaw.daemon.records import (
    NA,
    DaemonStatus,
    Event,
    GpuRecord,
    Metrics,
    PoolKind,
    SnapshotRecord,
)
from thaw.format.fingerprint import Fingerprint
from thawctl.tui.app import ThawTop
from thawctl.tui.screens.confirm import ConfirmScreen
from thawctl.tui.screens.help import HelpScreen
from thawctl.tui.screens.main import MainScreen
from thawctl.tui.source import Connection, DaemonSource
from thawctl.tui.widgets.events import EventLog
from thawctl.tui.widgets.sessions import SessionTable
from thawctl.tui.widgets.snapshots import SnapshotTable, column_widths
from thawctl.tui.widgets.throughput import ThroughputAxis

TIMEOUT = 20.0


async def wait_for(pilot: Any, predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def main_screen(app: ThawTop) -> MainScreen:
    screen = app.screen_stack[1] if len(app.screen_stack) > 1 else app.screen
    assert isinstance(screen, MainScreen)
    return screen


def table_names(app: ThawTop) -> list[str]:
    table = main_screen(app).query_one(SnapshotTable)
    return [str(row.key.value) for row in table.ordered_rows]


def log_text(app: ThawTop) -> str:
    return "\n".join(line.text for line in main_screen(app).query_one(EventLog).lines)


def restores_logged(text: str) -> int:
    """Restores the log accounts for: one a `restore_finished` line, N a line of N restores."""
    return sum(
        int(line.split(" restores, ")[0].split()[-1])
        if " restores, " in line
        else "restore_finished" in line
        for line in text.splitlines()
    )


def make_app(socket: str) -> ThawTop:
    return ThawTop(DaemonSource(socket, interval_s=0.2), interval_s=0.2)


def register(socket: str, path: Any, name: str, **labels: str) -> None:
    with thaw.connect(socket) as client:
        client.register(path, name, labels)


def snapshot_files(directory: Any, *names: str) -> list[Any]:
    out = []
    for i, name in enumerate(names):
        path = write_snapshot(directory / f"{name}.thaw", random_tensors(i))
        path.chmod(0o644)
        out.append(path)
    return out


# --- against a real daemon ----------------------------------------------------------------------


def test_pin_from_the_table(thawd: Any, snapshot_dir: Any) -> None:
    (path,) = snapshot_files(snapshot_dir, "llama")
    register(thawd.socket, path, "llama")

    async def scenario() -> None:
        app = make_app(thawd.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: table_names(app) == ["llama"], "the snapshot row")
            screen = main_screen(app)
            assert screen.connection.state == "connected"
            assert screen.status.pid == thawd.pid
            await pilot.press("p")
            await wait_for(
                pilot,
                lambda: [r.tier for r in screen.snapshots] == ["pinned"],
                "the pinned tier in the next metrics",
            )
            await wait_for(pilot, lambda: "pinned" in log_text(app), "the pinned event")
            table = screen.query_one(SnapshotTable)
            assert str(table.get_row_at(0)[1]) == "pinned"
            assert str(table.get_row_at(0)[7]) == "verified"
            await pilot.press("u")
            await wait_for(pilot, lambda: [r.tier for r in screen.snapshots] == ["cold"], "cold")
            await pilot.press("q")

    asyncio.run(scenario())
    with thaw.connect(thawd.socket) as client:
        assert client.stat("llama").tier == "cold"


def test_filter_sort_and_help(thawd: Any, snapshot_dir: Any) -> None:
    paths = snapshot_files(snapshot_dir, "alpha", "beta", "gamma")
    for path, name in zip(paths, ("alpha", "beta", "gamma"), strict=True):
        register(thawd.socket, path, name, team="red" if name == "gamma" else "blue")

    async def scenario() -> None:
        app = make_app(thawd.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: len(table_names(app)) == 3, "three rows")
            screen = main_screen(app)
            assert table_names(app) == ["alpha", "beta", "gamma"]
            await pilot.press("slash")
            assert screen.has_class("-filtering")
            await pilot.press("b", "e", "t")
            await wait_for(pilot, lambda: table_names(app) == ["beta"], "the filter")
            await pilot.press("enter")
            assert not screen.has_class("-filtering")
            assert screen.filter_text == "bet"
            assert "filter: bet" in str(screen.query_one(SnapshotTable).border_title)
            # The rows keep up with the metrics stream while filtered.
            await pilot.pause(0.5)
            assert table_names(app) == ["beta"]
            # Labels filter too; escape clears.
            await pilot.press("slash", "backspace", "backspace", "backspace")
            for key in "team=red":
                await pilot.press(key if key != "=" else "equals_sign")
            await wait_for(pilot, lambda: table_names(app) == ["gamma"], "the label filter")
            await pilot.press("escape")
            await wait_for(pilot, lambda: len(table_names(app)) == 3, "the cleared filter")
            assert screen.filter_text == ""
            # Sort: name -> tier; pin gamma so tier order differs from name order.
            with thaw.connect(thawd.socket) as client:
                client.pin("gamma")
            await pilot.press("s")
            assert screen.sort_key == "tier"
            await wait_for(pilot, lambda: table_names(app)[0] == "gamma", "gamma first by tier")
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            keys = str(app.screen.query_one("#help-keys").render())
            # What `v` really does: thawd hashes where the bytes are; thawctl reads nothing.
            assert "where its bytes are: its pool when pinned, else the file" in keys
            assert "reads the file here" not in keys
            await pilot.press("escape")
            assert isinstance(app.screen, MainScreen)
            await pilot.press("q")

    asyncio.run(scenario())


def test_remove_asks_first(thawd: Any, snapshot_dir: Any) -> None:
    paths = snapshot_files(snapshot_dir, "keep", "drop")
    register(thawd.socket, paths[0], "keep")
    register(thawd.socket, paths[1], "drop")

    async def scenario() -> None:
        app = make_app(thawd.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: table_names(app) == ["drop", "keep"], "two rows")
            assert main_screen(app).query_one(SnapshotTable).selected == "drop"
            await pilot.press("d")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            assert isinstance(app.screen, MainScreen)
            await pilot.pause(0.5)
            assert table_names(app) == ["drop", "keep"]
            await pilot.press("d")
            await pilot.press("y")
            await wait_for(pilot, lambda: table_names(app) == ["keep"], "the row to go")
            await wait_for(pilot, lambda: "unregistered" in log_text(app), "the event")

    asyncio.run(scenario())
    with thaw.connect(thawd.socket) as client:
        assert [r.name for r in client.list()] == ["keep"]
    assert paths[1].exists()


def test_unpin_of_a_snapshot_in_use_asks_first(thawd: Any, snapshot_dir: Any) -> None:
    """A restore held open (its progress callback waits) makes the snapshot's clients 1: `u`
    asks first; no keeps it pinned; yes asks thawd, which refuses while the restore runs."""
    from tests.daemon.conftest import zeros_like

    (path,) = snapshot_files(snapshot_dir, "busy")
    register(thawd.socket, path, "busy")
    with thaw.connect(thawd.socket) as client:
        client.pin("busy")
    opened, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        if not done:  # before the copy: the session is open
            opened.set()
            release.wait(TIMEOUT)

    def restore() -> None:
        with thaw.connect(thawd.socket) as client:
            client.restore(zeros_like(random_tensors(0)), "busy", progress=hold)

    restorer = threading.Thread(target=restore)
    restorer.start()
    try:
        assert opened.wait(TIMEOUT)

        async def scenario() -> None:
            app = make_app(thawd.socket)
            async with app.run_test(size=(100, 30)) as pilot:
                screen = main_screen(app)
                await wait_for(
                    pilot, lambda: [r.clients for r in screen.snapshots] == [1], "the open restore"
                )
                await pilot.press("u")
                assert isinstance(app.screen, ConfirmScreen)
                assert "in use: 1 restore(s) open" in str(app.screen.question)
                await pilot.press("n")
                assert isinstance(app.screen, MainScreen)
                await pilot.press("u", "y")
                await wait_for(
                    pilot, lambda: "busy (1 restore(s) open)" in log_text(app), "thawd's refusal"
                )
                assert [r.tier for r in screen.snapshots] == ["pinned"]
                release.set()
                await wait_for(
                    pilot,
                    lambda: [r.clients for r in screen.snapshots] == [0],
                    "the restore to end",
                )
                await pilot.press("u")  # no longer in use: no question
                assert isinstance(app.screen, MainScreen)
                await wait_for(
                    pilot, lambda: [r.tier for r in screen.snapshots] == ["cold"], "cold"
                )
                await pilot.press("q")

        asyncio.run(scenario())
    finally:
        release.set()
        restorer.join(TIMEOUT)


def test_sessions_view_shows_who_restores_what(thawd: Any, snapshot_dir: Any) -> None:
    """Key S: the restore held open shows with this process's pid and uid; once it ends, it
    is listed as done with its rate; S again brings the snapshots back."""
    from tests.daemon.conftest import zeros_like

    (path,) = snapshot_files(snapshot_dir, "watched")
    register(thawd.socket, path, "watched")
    opened, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        if not done:  # before the copy: the session is open
            opened.set()
            release.wait(TIMEOUT)

    def restore() -> None:
        with thaw.connect(thawd.socket) as client:
            client.restore(zeros_like(random_tensors(0)), "watched", progress=hold)

    restorer = threading.Thread(target=restore)
    restorer.start()
    try:
        assert opened.wait(TIMEOUT)

        async def scenario() -> None:
            app = make_app(thawd.socket)
            async with app.run_test(size=(120, 35)) as pilot:
                screen = main_screen(app)
                await pilot.press("S")
                table = screen.query_one(SessionTable)
                assert table.display and not screen.query_one(SnapshotTable).display

                def rows() -> list[list[str]]:
                    return [[str(c) for c in table.get_row(r.key)] for r in table.ordered_rows]

                await wait_for(pilot, lambda: rows() and rows()[0][0] == "open", "the open one")
                assert rows()[0][:5] == ["open", "restore", "watched", str(os.getpid()),
                                         str(os.getuid())]  # fmt: skip
                assert "1 open" in str(table.border_title)
                release.set()
                await wait_for(pilot, lambda: rows() and rows()[0][0] == "done", "the ended one")
                assert rows()[0][7].endswith("GB/s")
                await pilot.press("S")
                assert screen.query_one(SnapshotTable).display and not table.display
                await pilot.press("q")

        asyncio.run(scenario())
    finally:
        release.set()
        restorer.join(TIMEOUT)


def test_restores_are_gathered_in_the_log_under_load(thawd: Any, snapshot_dir: Any) -> None:
    """Sixty real restores in a burst: a few lines of "N restores", and the pin before them
    stays in sight."""
    from tests.daemon.conftest import zeros_like

    (path,) = snapshot_files(snapshot_dir, "hot")
    register(thawd.socket, path, "hot")

    async def scenario() -> None:
        app = make_app(thawd.socket)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: table_names(app) == ["hot"], "the row")
            with thaw.connect(thawd.socket) as client:
                client.pin("hot")
                await wait_for(pilot, lambda: "pinned" in log_text(app), "the pinned event")
                target = zeros_like(random_tensors(0))
                for _ in range(60):
                    await asyncio.to_thread(client.restore, target, "hot")
            await wait_for(
                pilot, lambda: restores_logged(log_text(app)) == 60, "all sixty restores in the log"
            )
            lines = log_text(app).splitlines()
            gathered = [line for line in lines if " restores, " in line]
            assert gathered and all(" hot (" in line for line in gathered)
            assert len([line for line in lines if "restore" in line]) < 30
            log = main_screen(app).query_one(EventLog)
            shown = lines[-log.scrollable_content_region.height :]
            assert any(" pinned " in line for line in shown), lines
            await pilot.press("q")

    asyncio.run(scenario())


def test_verify_from_the_table_reports_corruption(thawd: Any, snapshot_dir: Any) -> None:
    (path,) = snapshot_files(snapshot_dir, "v")
    corrupt_payload(path, "layers.0.proj")  # damaged before register: the bytes thawd reads
    register(thawd.socket, path, "v")

    async def scenario() -> None:
        app = make_app(thawd.socket)
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await wait_for(pilot, lambda: table_names(app) == ["v"], "the row")
            await pilot.press("v")
            await wait_for(pilot, lambda: "layers.0.proj" in log_text(app), "the verify error")
            assert "checksum mismatch" in log_text(app)

    asyncio.run(scenario())


def test_daemon_restart_shows_reconnecting_then_recovers(own_thawd: Any, snapshot_dir: Any) -> None:
    daemon = own_thawd()
    (path,) = snapshot_files(snapshot_dir, "survivor")
    register(daemon.socket, path, "survivor")

    async def scenario() -> None:
        app = make_app(daemon.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: table_names(app) == ["survivor"], "the row")
            screen = main_screen(app)
            first_pid = screen.status.pid
            await asyncio.to_thread(daemon.stop)
            await wait_for(
                pilot,
                lambda: screen.connection.state == "reconnecting",
                "reconnecting",
            )
            assert screen.has_class("-stale")
            assert "reconnecting" in log_text(app)
            assert table_names(app) == ["survivor"]  # the last known rows stay, dimmed
            await asyncio.to_thread(daemon.start)
            await wait_for(
                pilot,
                lambda: (
                    screen.connection.state == "connected"
                    and screen.status is not None
                    and screen.status.pid != first_pid
                ),
                "the new daemon",
            )
            assert not screen.has_class("-stale")
            await wait_for(pilot, lambda: table_names(app) == ["survivor"], "the row again")
            await pilot.press("q")

    asyncio.run(scenario())


def test_top_against_no_daemon_keeps_trying(tmp_path: Path) -> None:
    async def scenario() -> None:
        app = make_app(str(tmp_path / "absent.sock"))
        async with app.run_test(size=(80, 24)) as pilot:
            screen = main_screen(app)
            await wait_for(
                pilot,
                lambda: screen.connection is not None and screen.connection.state == "reconnecting",
                "reconnecting",
            )
            assert "systemctl start thawd" in log_text(app)
            await pilot.press("p")  # nothing selected: a notice, no crash
            await pilot.press("q")

    asyncio.run(scenario())


# --- the look: fixed records, no clocks ---------------------------------------------------------

T0 = 1_800_000_000.0  # every time below is relative to this fixed instant
GIB = 1 << 30


class StaticSource:
    """A source that plays fixed records, then waits: the dashboard's look, deterministically."""

    socket = "/run/thawd/thawd.sock"

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self._stopped = threading.Event()

    def stream(self) -> Iterator[Any]:
        yield from self.items
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    def pin(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    unpin = remove = verify = pin


def _snapshot(name: str, tier: str, size: int, **kw: Any) -> SnapshotRecord:
    values: dict[str, Any] = {
        "name": name,
        "path": f"/snapshots/{name}.thaw",
        "labels": {},
        "tier": tier,
        "wanted_tier": tier,
        "size_bytes": size,
        "file_bytes": size + (2 << 20),
        "resident_bytes": size if tier != "cold" else 0,
        "last_used": NA,
        "clients": 0,
        "restores": 0,
        "checksum_state": "verified" if tier == "pinned" else "unverified",
        "fingerprint": Fingerprint(architecture="LlamaForCausalLM", dtype="bfloat16"),
        "tensor_count": 291,
        "registered": T0 - 86400,
        "error": "",
        "file_pending": False,
    }
    values.update(kw)
    return SnapshotRecord(**values)


def fixed_items() -> list[Any]:
    gpus = tuple(GpuRecord(i, "NVIDIA H200", 150_019_129_344, NA, "PCIe Gen5 x16") for i in (0, 1))
    now = T0 + 7530
    status = DaemonStatus(
        version="0.1.0",
        api_version="thaw.v1",
        pid=4242,
        started=T0,
        uptime_s=7530.0,
        pool_kind=PoolKind.VMM,
        pinned_budget=64 * GIB,
        pinned_used=46 * GIB,
        warm_budget=128 * GIB,
        warm_used=52 * GIB,
        host_memory_total=512 * GIB,
        host_memory_available=301 * GIB,
        gpus=gpus,
        snapshots=5,
        active_restores=1,
        active_freezes=0,
        restores_total=57,
        bytes_restored_total=912 * GIB,
        memory_locked=True,
        socket="/run/thawd/thawd.sock",
        share_pool=True,
    )
    snapshots = (
        _snapshot("llama-8b", "pinned", 16 * GIB, restores=41, clients=1, last_used=now - 12),
        _snapshot(
            "qwen-32b", "warm", 52 * GIB, resident_bytes=42 * GIB, restores=9, last_used=now - 1500
        ),
        _snapshot("mistral-7b", "pinned", 14 * GIB, restores=7, last_used=now - 3 * 3600),
        _snapshot("llama-70b", "cold", 141 * GIB, wanted_tier="pinned"),
        _snapshot(
            "broken",
            "cold",
            2 * GIB,
            checksum_state="corrupt",
            error="checksum mismatch in tensor 'lm_head.weight'",
        ),
    )
    items: list[Any] = [Connection("connected", "thawd 0.1.0, pid 4242", now - 60)]
    events = [
        ("pinned", "llama-8b", "16.00 GiB in 0.31 s", -50),
        ("warmed", "qwen-32b", "52.00 GiB in 38.20 s", -40),
        ("restore_finished", "llama-8b", "16.00 GiB in 0.30 s (53.6 GB/s)", -12),
        ("pin_failed", "broken", "checksum mismatch in tensor 'lm_head.weight'", -5),
    ]
    items += [Event(now + dt, kind, name, msg, 0, 0.0) for kind, name, msg, dt in events]
    # 60 s of throughput: quiet, a burst of restores, quiet again.
    rates = [0.0] * 20 + [53.6e9, 54.1e9, 12.0e9, 0.0, 0.0, 52.8e9, 53.9e9, 55.0e9] + [0.0] * 32
    for i, rate in enumerate(rates):
        items.append(Metrics(now - len(rates) + i + 1, status, snapshots, rate))
    return items


def test_main_screen_snapshot(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    items = fixed_items()
    samples = sum(isinstance(i, Metrics) for i in items)

    async def settle(pilot: Any) -> None:
        await wait_for(pilot, lambda: len(main_screen(pilot.app).samples) == samples, "data")
        await pilot.pause()

    try:
        assert snap_compare(ThawTop(StaticSource(items)), terminal_size=(80, 24), run_before=settle)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (60, 20)])
def test_layout_holds_at_other_sizes(size: Any) -> None:
    async def scenario() -> None:
        app = ThawTop(StaticSource(fixed_items()))
        async with app.run_test(size=size) as pilot:
            await wait_for(pilot, lambda: len(table_names(app)) == 5, "rows")
            table = main_screen(app).query_one(SnapshotTable)
            assert table.size.height >= 4  # the table keeps room for rows at any size
            await pilot.press("s", "s")
            assert table_names(app)[0] == "llama-70b"  # size, largest first
            await pilot.press("q")

    asyncio.run(scenario())


def test_at_120x35_the_path_shows_and_no_row_is_left_empty() -> None:
    async def scenario() -> None:
        app = ThawTop(StaticSource(fixed_items()))
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_for(pilot, lambda: len(table_names(app)) == 5, "rows")
            await pilot.pause(0.2)
            screen = main_screen(app)
            table = screen.query_one(SnapshotTable)
            assert [str(c.label) for c in table.columns.values()][-1] == "PATH"
            assert next(c.width for c in table.columns.values()) == len("mistral-7b")
            assert str(table.get_row_at(2)[-1]) == "/snapshots/llama-8b.thaw"
            assert table.outer_size.height == 5 + 3  # five rows, the header, two borders
            log = screen.query_one(EventLog)
            assert log.size.height >= 35 - 10 - 8 - 1  # the rest of the screen is the log's
            await pilot.press("q")

    asyncio.run(scenario())


def test_column_widths_share_the_room_between_names_and_paths() -> None:
    # 80 columns: 76 inside the border and scrollbar, all of it names; no path.
    assert column_widths(76, 10, 1) == (12, 0)
    # 120 columns: the names as wide as the longest, the path the rest.
    assert column_widths(116, 10, 1) == (10, 40)
    # Names come first: a path with less than its least width is left out.
    assert column_widths(116, 34, 1) == (34, 16)
    assert column_widths(116, 35, 1) == (52, 0)
    assert column_widths(90, 30, 1) == (26, 0)


def test_keys_j_k_home_end_move_the_selection() -> None:
    async def scenario() -> None:
        app = ThawTop(StaticSource(fixed_items()))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: len(table_names(app)) == 5, "rows")
            table = main_screen(app).query_one(SnapshotTable)
            assert table.selected == "broken"
            await pilot.press("j", "j")
            assert table.selected == "llama-8b"
            await pilot.press("k")
            assert table.selected == "llama-70b"
            await pilot.press("end")
            assert table.selected == "qwen-32b"
            await pilot.press("home")
            assert table.selected == "broken"
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_log_gathers_each_seconds_restores_and_keeps_the_rest() -> Any:
    t = T0 + 100
    items: list[Any] = [Connection("connected", "thawd 0.1.0, pid 4242", t - 1)]

    def restore(at: float, name: str = "llama-8b") -> Event:
        return Event(at, "restore_finished", name, "16.00 GiB in 0.30 s (57.3 GB/s)", 16 * GIB, 0.3)

    items += [restore(t + i / 40, "qwen-32b" if i % 10 == 0 else "llama-8b") for i in range(20)]
    items.append(Event(t + 0.9, "pinned", "mistral-7b", "14.00 GiB in 0.28 s", 14 * GIB, 0.28))
    items += [restore(t + 1 + i / 40) for i in range(25)]
    items.append(Event(t + 1.5, "restore_failed", "llama-8b", "the client went away", 0, 0.0))
    items.append(Event(t + 1.6, "pin_failed", "broken", "checksum mismatch in tensor 'x'", 0, 0))
    items.append(restore(t + 3))  # alone in its second: written as it came, once it is over

    async def scenario() -> None:
        app = ThawTop(StaticSource(items))
        async with app.run_test(size=(120, 35)) as pilot:
            await wait_for(pilot, lambda: restores_logged(log_text(app)) == 46, "the restores")
            lines = [line.split(" ", 1)[1] for line in log_text(app).splitlines()]
            assert lines == [
                "connection       connected: thawd 0.1.0, pid 4242",
                "restores         llama-8b (18), qwen-32b (2) 20 restores, 320.0 GiB at 57.27 GB/s",
                "pinned           mistral-7b 14.00 GiB in 0.28 s",
                "restores         llama-8b (25) 25 restores, 400.0 GiB at 57.27 GB/s",
                "restore_failed   llama-8b the client went away",
                "pin_failed       broken checksum mismatch in tensor 'x'",
                "restore_finished llama-8b 16.00 GiB in 0.30 s (57.3 GB/s)",
            ]
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_plot_is_labelled_with_its_scale() -> None:
    async def scenario() -> None:
        app = ThawTop(StaticSource(fixed_items()))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: len(main_screen(app).samples) == 60, "samples")
            await pilot.pause()
            axis = str(main_screen(app).query_one(ThroughputAxis).render())
            assert axis.splitlines() == ["55.0 GB/s ┤", "        0 ┤"]
            await pilot.press("q")

    asyncio.run(scenario())
