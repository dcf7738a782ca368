"""`thawctl events` and `thawctl doctor` against real thawd processes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from thawctl_testlib import NO_DAEMON, ROOT, one_error_line

import thaw
from thawctl import exitcodes

CHECKS = ["socket", "group", "thawd", "memlock", "vmm", "pcie", "page cache"]


# `thawctl` as a terminal runs it: SIGINT handled (KeyboardInterrupt) and not blocked. A child
# inherits an ignored or blocked SIGINT, and the suite's own process may have one by the time
# this runs (a background job's shell ignores it; CI's `thawctl events` then never saw Ctrl-C:
# its stacks showed it waiting on the stream, twice). The child's interpreter sets it itself:
# a preexec_fn would make subprocess fork(), whose gRPC fork handler restarts gRPC's poller in
# the child, where close_fds then closes its epoll fd ("epoll_wait error: Bad file descriptor"
# on the child's stderr failed a CI run; grpc/grpc#43055).
THAWCTL_AS_A_TERMINAL_RUNS_IT = (
    "import runpy, signal; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "runpy.run_module('thawctl', run_name='__main__', alter_sys=True)"
)


def start_events(*argv: str, socket: str) -> subprocess.Popen[str]:
    """`thawctl events ARGS` in its own interpreter, stdout a pipe."""
    command = [sys.executable, "-c", THAWCTL_AS_A_TERMINAL_RUNS_IT, "--socket", socket]
    return subprocess.Popen(
        [*command, "events", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        # A hang is dumped (every thread's stack) when `ended` sends SIGABRT.
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1"),
    )


def ended(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """`proc.communicate(timeout)`; on a timeout, the test fails with the stacks of all of
    `proc`'s threads (faulthandler, on SIGABRT) rather than a bare TimeoutExpired."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"{proc.args!r} did not end in {timeout} s; its threads:\n{err[-6000:]}")


def until_done(proc: subprocess.Popen[str], step: Any, timeout: float = 60.0) -> tuple[str, str]:
    """Call `step(i)` every 0.2 s until `proc` exits: thawd keeps no history of events, so
    the first ones may come before the watcher has subscribed."""
    deadline = time.monotonic() + timeout
    i = 0
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the events command did not finish"
        step(i)
        i += 1
        time.sleep(0.2)
    return proc.communicate(timeout=10)


# --- events ---------------------------------------------------------------------------------------


def test_events_as_lines_and_as_json_lines_filtered_by_kind(thawd: Any, snapshot_file: Any) -> None:
    lines = start_events("--kind", "registered", "--count", "3", socket=thawd.socket)
    jsonl = start_events("--json", "--kind", "pinned,unpinned", "--count", "4", socket=thawd.socket)
    with thaw.connect(thawd.socket) as client:
        client.register(snapshot_file, "p")

        registered = itertools.count()

        def step(i: int) -> None:
            client.register(snapshot_file, f"r{next(registered)}")  # an event for `lines`
            if i % 2:
                client.unpin("p")
            else:
                client.pin("p")

        out, err = until_done(lines, step)
        assert lines.returncode == 0, err
        out_json, err_json = until_done(jsonl, step)
    assert jsonl.returncode == 0, err_json
    rows = out.splitlines()
    assert len(rows) == 3 and err == ""
    first = int(rows[0].split()[3].removeprefix("r"))
    for k, row in enumerate(rows):  # local time, kind, snapshot, message
        day, clock, kind, subject, path = row.split()
        time.strptime(f"{day} {clock.split('.')[0]}", "%Y-%m-%d %H:%M:%S")
        assert (kind, subject, path) == ("registered", f"r{first + k}", str(snapshot_file))
    docs = [json.loads(line) for line in out_json.splitlines()]
    assert len(docs) == 4
    for doc in docs:
        assert set(doc) == {"time_unix", "kind", "snapshot", "message", "bytes", "duration_s"}
        assert doc["snapshot"] == "p" and doc["kind"] in ("pinned", "unpinned")
    assert all(d["bytes"] > 0 for d in docs if d["kind"] == "pinned")
    kinds = [d["kind"] for d in docs]
    assert all(a != b for a, b in itertools.pairwise(kinds))  # they alternate


def first_line(proc: subprocess.Popen[str], step: Any, timeout: float = 60.0) -> str:
    """Call `step(i)` until `proc` prints a line (then it is subscribed); that line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    i = 0
    while not select.select([proc.stdout], [], [], 0.2)[0]:
        assert time.monotonic() < deadline and proc.poll() is None, "no event came"
        step(i)
        i += 1
    return proc.stdout.readline()


def test_events_end_quietly_on_ctrl_c_and_with_exit_3_when_thawd_stops(
    own_thawd: Any, snapshot_file: Any
) -> None:
    daemon = own_thawd()
    interrupted = start_events(socket=daemon.socket)
    stopped = start_events("--json", socket=daemon.socket)
    with thaw.connect(daemon.socket) as client:
        registered = itertools.count()

        def step(i: int) -> None:
            client.register(snapshot_file, f"r{next(registered)}")

        assert " registered " in first_line(interrupted, step)
        assert json.loads(first_line(stopped, step))["kind"] == "registered"
    interrupted.send_signal(signal.SIGINT)
    out, err = ended(interrupted, 20)
    assert interrupted.returncode == 0 and err == "", err
    daemon.stop()
    out, err = ended(stopped, 30)
    assert stopped.returncode == exitcodes.DAEMON_UNAVAILABLE
    assert "ended the event stream" in one_error_line(err)
    assert json.loads(out.splitlines()[-1])["kind"] == "stopping"


# --- doctor ---------------------------------------------------------------------------------------


@contextmanager
def memlock_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_MEMLOCK lowered to `soft` (a thawd started meanwhile keeps it)."""
    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    hard = before[1]
    if hard != resource.RLIM_INFINITY and hard < soft:
        pytest.skip(f"the hard RLIMIT_MEMLOCK here is {hard} bytes, below {soft}")
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, before)


def by_name(doc: dict) -> dict[str, dict]:
    assert [c["name"] for c in doc["checks"]] == CHECKS
    for c in doc["checks"]:
        assert set(c) == {"name", "state", "detail", "hint"}
        assert c["state"] in ("pass", "warn", "fail", "skip")
    return {c["name"]: c for c in doc["checks"]}


def test_doctor_passes_on_a_host_set_up_for_thaw(thawctl: Any, own_thawd: Any) -> None:
    with memlock_limit(8 << 20):
        daemon = own_thawd(pinned_budget="4MiB")  # within its locked-memory limit
    result = thawctl("doctor", "--json")
    assert result.code == 0, result.out
    doc = result.json()
    checks = by_name(doc)
    assert doc["ok"] is True
    assert {c["state"] for c in doc["checks"]} <= {"pass", "skip"}, result.out
    assert checks["thawd"]["detail"].startswith(
        f"thawd {thaw.__version__} (api thaw.v1), pid {daemon.pid}"
    )
    assert checks["memlock"]["detail"] == (
        "thawd's RLIMIT_MEMLOCK is 8.0 MiB, its pinned budget 4.0 MiB"
    )
    assert f"{daemon.socket}: a socket, mode 660" in checks["socket"]["detail"]
    # No GPU on this machine: the GPU checks say so instead of failing.
    assert checks["vmm"]["state"] == checks["pcie"]["state"] == "skip"
    human = thawctl("doctor")
    assert human.code == 0
    assert human.out.splitlines()[-1] == "7 checks: 5 passed, 0 warned, 0 failed, 2 skipped"
    assert human.out.splitlines()[3].startswith("PASS  memlock     thawd's RLIMIT_MEMLOCK")


def test_doctor_fails_a_memlock_limit_below_the_pinned_budget(thawctl: Any, own_thawd: Any) -> None:
    with memlock_limit(1 << 20):
        own_thawd(pinned_budget="16MiB")
    result = thawctl("doctor")
    assert result.code == exitcodes.ERROR
    memlock = next(line for line in result.out.splitlines() if line.startswith("FAIL  memlock"))
    assert "RLIMIT_MEMLOCK is 1.0 MiB, its pinned budget 16.0 MiB" in memlock
    assert "LimitMEMLOCK=infinity" in result.out


def test_doctor_without_a_daemon(thawctl: Any) -> None:
    result = thawctl("--socket", NO_DAEMON, "doctor", "--json")
    assert result.code == exitcodes.ERROR
    checks = by_name(result.json())
    assert checks["socket"]["state"] == "fail"
    assert "does not exist" in checks["socket"]["detail"]
    assert checks["thawd"]["state"] == "fail"
    assert "systemctl start thawd" in checks["thawd"]["detail"]
    assert checks["memlock"]["state"] == checks["page cache"]["state"] == "skip"


def test_doctor_as_a_user_outside_the_sockets_group(thawd: Any) -> None:
    """uid 65534, not in the socket's group (root): the socket and group checks fail and say
    how to join; thawd is unreachable for this user."""
    code = f"""
import os, sys, json
sys.path.insert(0, {str(ROOT)!r})
import thaw.client, thaw.errors, thaw.daemon.fdsocket
from thawctl import cli, doctor, sockets, render, schema, exitcodes
try:
    import thaw.mem.cuda, thaw.mem.vmm
except ImportError:
    pass
# The interpreter's files are root's alone here: everything is imported before the drop.
cli.build_parser()
import thaw, grpc, thaw._proto.thawd_pb2_grpc, thaw.daemon.records
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(cli.main(["--socket", {thawd.socket!r}, "doctor", "--json"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == exitcodes.ERROR, done.stderr
    checks = by_name(json.loads(done.stdout))
    assert checks["socket"]["state"] == "fail"
    assert "uid 65534 may not connect" in checks["socket"]["detail"]
    group = checks["group"]
    assert group["state"] == "fail" and "is not in root, the socket's group" in group["detail"]
    assert group["hint"].startswith("`sudo usermod -aG root ")
    assert checks["thawd"]["state"] == "fail"


def test_page_cache_warns_when_the_warm_snapshots_do_not_fit(
    thawctl: Any, thawd: Any, snapshot_file: Any
) -> None:
    from thawctl import doctor

    assert thawctl("pin", str(snapshot_file), "--warm").code == 0
    with thaw.connect(thawd.socket) as client:
        status, records = client.status(), tuple(client.list())
    ok = doctor.page_cache_check(status, records)
    assert ok.state == "pass" and "warm snapshots 80.0 KiB" in ok.detail
    tight = dataclasses.replace(status, host_memory_available=64 << 10)
    assert doctor.page_cache_check(tight, records).state == "warn"


def _device(root: Path, address: str, **files: str) -> None:
    d = root / address
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text + "\n")


def test_pcie_links_from_sysfs(tmp_path: Path) -> None:
    """The kernel's /sys/bus/pci/devices layout: a GPU whose link runs narrower than it can
    warns; one trained down while idle passes with a note; other devices are ignored."""
    from thawctl import doctor

    gen5 = {
        "vendor": "0x10de",
        "class": "0x030200",
        "max_link_speed": "32.0 GT/s PCIe",
        "max_link_width": "16",
    }
    _device(
        tmp_path,
        "0000:17:00.0",
        current_link_speed="2.5 GT/s PCIe",
        current_link_width="16",
        **gen5,
    )
    _device(tmp_path, "0000:00:1f.6", vendor="0x8086", **{"class": "0x020000"})
    idle = doctor.pcie_check(str(tmp_path), nvidia_smi=list)
    assert idle.state == "pass"
    assert idle.detail == "0000:17:00.0 Gen1 x16 (Gen5 under load; idle links train down)"
    _device(
        tmp_path,
        "0000:4b:00.0",
        current_link_speed="32.0 GT/s PCIe",
        current_link_width="8",
        **gen5,
    )
    narrow = doctor.pcie_check(str(tmp_path), nvidia_smi=list)
    assert narrow.state == "warn" and "0000:4b:00.0 Gen5 x8 (of x16)" in narrow.detail
    assert doctor.pcie_check(str(tmp_path / "none"), nvidia_smi=list).state == "skip"
