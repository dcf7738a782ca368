"""Operating a real thawd: SIGHUP reloads, the systemd watchdog.

Each test runs thawd as systemd would (tests/daemon/conftest.py: NOTIFY_SOCKET, signals) and
checks what an operator sees: notifications, log lines, `thawctl status`'s numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.daemon.conftest import (
    ThawdProcess,
    make_dir,
    random_tensors,
    run_client,
    same,
    write_snapshot,
    zeros_like,
)
from thaw import errors
from thaw.client import connect


def big(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(768, 1024, generator=g)}  # 3 MiB -> a 4 MiB pool buffer


def reload(daemon: ThawdProcess, timeout: float = 15.0) -> list[str]:
    """SIGHUP, then the notifications up to the READY=1 that ends the reload."""
    seen = len(daemon.notifications)
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while "READY=1" not in daemon.notifications[seen:]:
        assert time.monotonic() < deadline, f"no READY=1 after SIGHUP:\n{daemon.log.read_text()}"
        daemon.drain_notifications(timeout=0.2)
    assert daemon.proc is not None and daemon.proc.poll() is None
    return daemon.notifications[seen:]


# A foreground thawd's line: its time, its level, the logger, the message.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def log_lines(daemon: ThawdProcess, level: str) -> list[str]:
    lines = daemon.log.read_text().splitlines()
    return [ln for ln in lines if (m := TIMESTAMP.match(ln)) and m.group(1) == level]


def test_sighup_applies_a_raised_budget_and_keeps_what_is_pinned(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory(pinned_budget="8MiB")  # type: ignore[operator]
    with connect(daemon.socket) as c:
        for i in range(3):
            c.register(write_snapshot(daemon.dir / f"s{i}.thaw", big(i)), f"s{i}")
        c.pin("s0")
        c.pin("s1")
        with pytest.raises(errors.BudgetExceeded):
            c.pin("s2")
        daemon.configure(pinned_budget="16MiB", warm_budget="32MiB")
        notes = reload(daemon)
        # systemd's reload protocol: RELOADING=1 with the monotonic time, then READY=1.
        assert notes.index("RELOADING=1") < notes.index("READY=1")
        (usec,) = [int(n.split("=")[1]) for n in notes if n.startswith("MONOTONIC_USEC=")]
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30e6
        status = c.status()
        assert (status.pinned_budget, status.warm_budget) == (16 << 20, 32 << 20)
        assert c.stat("s0").tier == c.stat("s1").tier == "pinned"
        c.pin("s2")
        assert c.status().pinned_used == 12 << 20
        # Lowered below use: nothing is unpinned, new pins are refused.
        daemon.configure(pinned_budget="4MiB")
        reload(daemon)
        assert [c.stat(f"s{i}").tier for i in range(3)] == ["pinned"] * 3
        c.unpin("s2")
        with pytest.raises(errors.BudgetExceeded):
            c.pin("s2")
    (warning,) = [w for w in log_lines(daemon, "WARNING") if "pinned_budget" in w]
    assert "4.00 MiB is below the 12.00 MiB in use: nothing is unpinned" in warning
    assert any("reloaded: pinned_budget 8.00 MiB -> 16.00 MiB, warm_budget 256.00 MiB -> "
               "32.00 MiB" in line for line in log_lines(daemon, "INFO"))  # fmt: skip


def test_sighup_with_a_broken_config_changes_nothing_and_keeps_serving(
    thawd_factory: object,
) -> None:
    daemon: ThawdProcess = thawd_factory()  # type: ignore[operator]
    with connect(daemon.socket) as c:
        c.register(write_snapshot(daemon.dir / "s.thaw", big(0)), "s")
        c.pin("s")
        good = daemon.config_path.read_text()
        budget = 'pinned_budget = "256MiB"'
        assert budget in good
        for broken in (good.replace(budget, 'pinned_budget = "1GiB'),  # TOML syntax
                       good.replace(budget, 'pinned_budget = "lots"'),
                       good + "colour = 1\n"):  # fmt: skip
            daemon.config_path.write_text(broken)
            notes = reload(daemon)
            assert notes.index("RELOADING=1") < notes.index("READY=1")
        assert c.status().pinned_budget == 256 << 20
        assert c.stat("s").tier == "pinned"
    errors_ = log_lines(daemon, "ERROR")
    assert len(errors_) == 3, errors_
    assert all("reload refused, nothing changed, serving as before" in e for e in errors_)
    assert "not valid TOML" in errors_[0] and "line " in errors_[0]
    assert 'pinned_budget = "lots": write a size' in errors_[1]
    assert "unknown key colour" in errors_[2]
    assert "Traceback" not in daemon.log.read_text()


def test_sighup_names_the_keys_that_need_a_restart_and_keeps_them(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory()  # type: ignore[operator]
    daemon.configure(state_dir=str(daemon.dir / "elsewhere"), vmm_chunk="64MiB", io_threads=3)
    reload(daemon)
    (warning,) = log_lines(daemon, "WARNING")
    assert "reload: state_dir, vmm_chunk need a restart to change" in warning
    assert f"state_dir={str(daemon.dir / 'state')!r}" in warning
    assert any("reloaded: io_threads 2 -> 3" in line for line in log_lines(daemon, "INFO"))
    assert not (daemon.dir / "elsewhere").exists()
    with connect(daemon.socket) as c:
        assert c.status().socket == daemon.socket


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_sighup_swaps_the_allow_list_of_both_sockets() -> None:
    uid = 65534
    daemon = ThawdProcess(make_dir(), socket_mode="0666").start()
    code = f"""
try:
    thaw.client.connect({daemon.socket!r}).list()
    print("ALLOWED")
except thaw.errors.PermissionDenied as e:
    print("DENIED", e)
"""
    try:
        assert run_client(code, uid=uid).stdout.startswith("DENIED")
        daemon.configure(allow_uids=[uid])
        reload(daemon)
        out = run_client(code, uid=uid)
        assert out.stdout.startswith("ALLOWED"), out.stdout + out.stderr
        daemon.configure(allow_uids=[])
        reload(daemon)
        assert run_client(code, uid=uid).stdout.startswith("DENIED")
    finally:
        daemon.close()


def test_the_watchdog_is_pinged_from_the_loop_when_systemd_sets_one() -> None:
    directory = make_dir()
    daemon = ThawdProcess(directory).start(env={"WATCHDOG_USEC": "400000"})
    try:
        daemon.drain_notifications(timeout=1.5)
        # Half of 0.4 s: about 7 pings in the 1.5 s after READY=1 (one at once).
        assert 4 <= daemon.notifications.count("WATCHDOG=1") <= 10, daemon.notifications
        os.kill(daemon.pid, signal.SIGSTOP)  # a stalled loop (the whole process, here)
        try:
            count = daemon.notifications.count("WATCHDOG=1")
            assert daemon.drain_notifications(timeout=1.0).count("WATCHDOG=1") == count
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_no_watchdog_pings_unless_systemd_asks(thawd: ThawdProcess) -> None:
    # Another process's watchdog (WATCHDOG_PID) is not this one's either.
    assert "WATCHDOG=1" not in thawd.drain_notifications(timeout=1.0)
    directory = make_dir()
    other = ThawdProcess(directory).start(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        assert "WATCHDOG=1" not in other.drain_notifications(timeout=1.0)
    finally:
        other.close()


# --- logs --------------------------------------------------------------------------------------


def journal_stream(path: Path) -> str:
    """$JOURNAL_STREAM as systemd sets it for a unit whose stdout is `path`."""
    path.touch()
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def test_under_journald_lines_carry_syslog_priorities_and_no_time() -> None:
    directory = make_dir()
    daemon = ThawdProcess(directory)
    try:
        daemon.start(env={"JOURNAL_STREAM": journal_stream(daemon.log)})
        daemon.configure(vmm_chunk="64MiB", log_level="warning")
        reload(daemon)  # a WARNING (vmm_chunk needs a restart), then warnings only
        daemon.configure(log_level="info")
        reload(daemon)
        assert daemon.stop() == 0
        lines = daemon.log.read_text().splitlines()
        assert lines and all(re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR) thawd", ln)
                             for ln in lines), lines  # fmt: skip
        assert any(ln.startswith("<6>INFO thawd: thawd ") and " ready on " in ln for ln in lines)
        assert any(ln.startswith("<4>WARNING thawd.reload: reload: vmm_chunk") for ln in lines)
        assert any(ln.startswith("<6>INFO thawd: stopped") for ln in lines)
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_in_the_foreground_lines_carry_their_time(thawd_factory: object) -> None:
    # A JOURNAL_STREAM that is not stdout's (inherited, or output sent elsewhere) is no journal.
    directory = make_dir()
    daemon = ThawdProcess(directory)
    try:
        daemon.start(env={"JOURNAL_STREAM": "1:1"})
        assert daemon.stop() == 0
        lines = daemon.log.read_text().splitlines()
        assert lines and all(TIMESTAMP.match(ln) for ln in lines), lines
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def restore_times(daemon: ThawdProcess, n: int) -> None:
    tensors = random_tensors(3)
    with connect(daemon.socket) as c:
        c.register(write_snapshot(daemon.dir / "s.thaw", tensors), "s")
        c.pin("s")
        for _ in range(n):
            target = zeros_like(tensors)
            c.restore(target, "s")
            assert same(target, tensors)


def test_restores_log_one_summary_not_a_line_each(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory()  # type: ignore[operator]
    restore_times(daemon, 25)
    assert daemon.stop() == 0
    info = [ln.split(" ", 3)[3] for ln in daemon.log.read_text().splitlines()
            if TIMESTAMP.match(ln) and " INFO " in ln]  # fmt: skip
    assert any(ln.startswith("thawd.events: event pinned s ") for ln in info), info
    mentions = [ln for ln in info if "estore" in ln]
    (summary,) = mentions  # the summary at stop: nothing else about restores
    assert re.fullmatch(r"thawd: restores since the last summary: 25 \(\S+ \S+\), "
                        r"p50 [\d.]+ ms, p99 [\d.]+ ms, 0 failed", summary), summary  # fmt: skip


def test_at_debug_every_restore_is_logged(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory(log_level="debug")  # type: ignore[operator]
    restore_times(daemon, 3)
    assert daemon.stop() == 0
    text = daemon.log.read_text()
    assert text.count("DEBUG thawd.events: event restore_finished s ") == 3


def test_json_logs_are_one_object_per_line(thawd_factory: object) -> None:
    daemon: ThawdProcess = thawd_factory(log_format="json")  # type: ignore[operator]
    restore_times(daemon, 2)
    assert daemon.stop() == 0
    docs = [json.loads(ln) for ln in daemon.log.read_text().splitlines()]
    assert docs and all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    (pinned,) = [d for d in docs if d.get("event") == "pinned"]
    assert (pinned["level"], pinned["logger"], pinned["snapshot"]) == ("info", "thawd.events", "s")
    (summary,) = [d for d in docs if "restores" in d]
    assert (summary["restores"], summary["failed"]) == (2, 0)
    assert summary["bytes"] == 2 * sum(t.nbytes for t in random_tensors(3).values())
    access = [d for d in docs if d.get("method") == "Pin"]
    assert access and access[0]["code"] == "OK" and access[0]["uid"] == os.getuid()


# --- backup -------------------------------------------------------------------------------------


def test_the_registry_backs_up_while_thawd_runs(thawd_factory: object, tmp_path: Path) -> None:
    """docs/OPERATIONS.md's backups of a live registry (WAL mode): through SQLite's backup, with
    the sqlite3 tool where it is installed, and a thawd started on the copy knows the snapshots."""
    daemon: ThawdProcess = thawd_factory()  # type: ignore[operator]
    with connect(daemon.socket) as c:
        for i in range(3):
            c.register(write_snapshot(daemon.dir / f"s{i}.thaw", random_tensors(i)), f"s{i}")
        c.pin("s1")
    registry = daemon.dir / "state" / "registry.sqlite3"
    assert Path(f"{registry}-wal").exists()  # the last changes may be in the WAL only
    copies = [tmp_path / "python.sqlite3"]
    subprocess.run([sys.executable, "-c", "import sqlite3; sqlite3.connect("
                    f"{str(registry)!r}).backup(sqlite3.connect({str(copies[0])!r}))"],
                   check=True, timeout=60)  # fmt: skip
    if shutil.which("sqlite3"):
        copies.append(tmp_path / "cli.sqlite3")
        subprocess.run(["sqlite3", str(registry), f".backup {copies[1]}"], check=True, timeout=60)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.stop() == 0
    for copy in copies:
        with contextlib.closing(sqlite3.connect(copy)) as db:
            rows = sorted(db.execute("SELECT name, wanted_tier FROM snapshots"))
        assert rows == [("s0", "cold"), ("s1", "pinned"), ("s2", "cold")]
    # Restored: the stopped thawd's registry replaced by the copy, and it starts on it.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    shutil.copy(copies[-1], registry)
    daemon.restart()
    with connect(daemon.socket) as c:
        assert sorted(s.name for s in c.list()) == ["s0", "s1", "s2"]
        assert c.stat("s1").tier == "pinned"  # re-pinned at start
