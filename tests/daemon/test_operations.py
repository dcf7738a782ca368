"""Operating a real thawd: SIGHUP reloads, the systemd watchdog.

Each test runs thawd as systemd would (tests/daemon/conftest.py: NOTIFY_SOCKET, signals) and
checks what an operator sees: notifications, log lines, `thawctl status`'s numbers.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.daemon.conftest import ThawdProcess, make_dir, run_client, write_snapshot
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


def log_lines(daemon: ThawdProcess, level: str) -> list[str]:
    return [line for line in daemon.log.read_text().splitlines() if line.startswith(level)]


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
