"""Every daemon command against a real thawd on a temporary socket: output, --json schemas,
exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from thawctl_testlib import (
    BENCH_KEYS,
    BENCH_RESULT_KEYS,
    FILE_INFO_KEYS,
    PIN_KEYS,
    ROOT,
    SNAPSHOT_KEYS,
    STATUS_KEYS,
    VERIFY_KEYS,
    assert_keys,
    corrupt_payload,
    one_error_line,
    random_tensors,
    run_subprocess,
    write_snapshot,
)

from thawctl import exitcodes


def test_status(thawctl: Any, thawd: Any) -> None:
    result = thawctl("status", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert_keys(doc, STATUS_KEYS)
    assert doc["pid"] == thawd.pid
    assert doc["socket"] == thawd.socket
    assert doc["pool_kind"] == "memfd"
    assert doc["pinned"] == {"budget_bytes": 256 << 20, "used_bytes": 0}
    assert set(doc["warm"]) == {"budget_bytes", "used_bytes"}
    assert doc["host_memory"]["total_bytes"] >= doc["host_memory"]["available_bytes"] > 0
    assert doc["gpus"] == []
    human = thawctl("status")
    assert human.code == 0
    assert f"pid {thawd.pid}" in human.out and "256.0 MiB" in human.out


def test_register_ls_and_filters(
    thawctl: Any, thawd: Any, snapshot_file: Any, snapshot_dir: Any
) -> None:
    result = thawctl(
        "register", str(snapshot_file), "--name", "alpha", "--label", "team=a", "--json"
    )
    assert result.code == 0, result.err
    record = result.json()["snapshot"]
    assert_keys(record, SNAPSHOT_KEYS)
    assert record["name"] == "alpha" and record["tier"] == "cold"
    assert record["labels"] == {"team": "a"}
    assert record["last_restore_unix"] is None
    assert record["checksum_state"] == "unverified"
    assert record["tensor_count"] == 4
    assert record["fingerprint"]["model"] == "fixture"

    other = write_snapshot(snapshot_dir / "beta.thaw", random_tensors(1))
    other.chmod(0o644)
    human = thawctl("register", str(other))  # name from the file name
    assert human.code == 0 and "registered beta" in human.out

    listed = thawctl("ls", "--json").json()["snapshots"]
    assert [s["name"] for s in listed] == ["alpha", "beta"]
    for s in listed:
        assert_keys(s, SNAPSHOT_KEYS)
    assert thawctl("ls", "-q").out == "alpha\nbeta\n"
    assert thawctl("ls", "-q", "--label", "team=a").out == "alpha\n"
    assert thawctl("ls", "-q", "--tier", "pinned").out == ""
    table = thawctl("ls").out
    assert table.splitlines()[0].split()[:3] == ["NAME", "TIER", "SIZE"]
    assert "alpha" in table and "cold" in table and "never" in table
    wide = thawctl("ls", "-o", "wide").out.splitlines()
    headers = wide[0].split()
    assert headers[-5:] == ["CHECKSUMS", "LABELS", "FINGERPRINT", "REGISTERED", "PATH"]
    alpha = wide[1].split()
    assert alpha[0] == "alpha" and alpha[-1] == str(snapshot_file.resolve())
    # labels, the fingerprint's recorded parts (these fixtures record the model only), age
    assert alpha[-6:-3] == ["unverified", "team=a", "fixture"] and alpha[-2] == "ago"
    from thawctl.snapshots import fingerprint_summary

    shard = {
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "quantization": "",
        "engine": "vllm",
        "engine_version": "0.32.0",
        "tp_rank": 1,
        "tp_size": 2,
        "model": "tiny",
    }
    assert fingerprint_summary(shard) == "LlamaForCausalLM/float32/vllm-0.32.0/tp1of2/tiny"


def test_register_errors(thawctl: Any, thawd: Any, snapshot_file: Any, tmp_path: Path) -> None:
    assert thawctl("register", str(snapshot_file), "--name", "a").code == 0
    duplicate = thawctl("register", str(snapshot_file), "--name", "a")
    assert duplicate.code == exitcodes.ERROR
    assert "already registered" in one_error_line(duplicate.err)
    bad_name = thawctl("register", str(snapshot_file), "--name", "no spaces please")
    assert bad_name.code == exitcodes.USAGE
    one_error_line(bad_name.err)
    garbage = tmp_path / "garbage.thaw"
    garbage.write_bytes(b"x" * 5000)
    refused = thawctl("register", str(garbage))
    assert refused.code == exitcodes.SNAPSHOT_CORRUPT, refused.err
    one_error_line(refused.err)


def test_a_missing_file_exits_4(thawctl: Any, thawd: Any, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.thaw")
    for argv in (["register", missing], ["pin", missing], ["register", missing, "--name", "x"]):
        result = thawctl(*argv)
        assert result.code == exitcodes.NOT_FOUND, (argv, result.err)
        line = one_error_line(result.err)
        assert line == f"thawctl: error: {missing}: no such file; check the path"
    assert thawctl("ls", "-q").out == ""


def test_a_refused_request_points_at_the_commands_own_help(
    thawctl: Any, thawd: Any, snapshot_file: Any
) -> None:
    result = thawctl("register", str(snapshot_file), "--name", "no spaces please")
    assert result.code == exitcodes.USAGE
    line = one_error_line(result.err)
    assert line.endswith("see `thawctl register --help`") and "COMMAND" not in line


def test_one_file_is_not_registered_twice_unless_named_on_purpose(
    thawctl: Any, thawd: Any, snapshot_file: Any
) -> None:
    assert thawctl("register", str(snapshot_file), "--name", "first").code == 0
    again = thawctl("register", str(snapshot_file))
    assert again.code == exitcodes.ERROR
    line = one_error_line(again.err)
    assert f"{snapshot_file} is already registered as first" in line and "--name" in line
    link = snapshot_file.with_name("link.thaw")  # the same file by another path
    link.symlink_to(snapshot_file)
    assert "already registered as first" in one_error_line(thawctl("register", str(link)).err)
    assert thawctl("ls", "-q").out == "first\n"
    # A second name, asked for explicitly, is allowed and said.
    second = thawctl("register", str(snapshot_file), "--name", "second")
    assert second.code == 0, second.err
    assert second.err == f"thawctl: note: {snapshot_file.resolve()} is also registered as first\n"
    assert thawctl("ls", "-q").out == "first\nsecond\n"


def test_a_hung_daemon_is_reported_within_the_timeout(thawctl: Any, own_thawd: Any) -> None:
    import signal
    import time

    daemon = own_thawd()
    os.kill(daemon.pid, signal.SIGSTOP)  # accepts connections (the kernel does), answers none
    try:
        started = time.monotonic()
        result = thawctl("--timeout", "1", "status")
        elapsed = time.monotonic() - started
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert result.code == exitcodes.DAEMON_UNAVAILABLE
    assert "did not answer" in one_error_line(result.err) and "1.0 s" in result.err
    assert elapsed < 5, elapsed
    assert thawctl("--timeout", "1", "status").code == 0  # and thawd is fine once it runs again


def test_unknown_name_exits_4(thawctl: Any, thawd: Any) -> None:
    for argv in (
        ["info", "nope"],
        ["pin", "nope"],
        ["unpin", "nope"],
        ["rm", "nope"],
        ["verify", "nope"],
    ):
        result = thawctl(*argv)
        assert result.code == exitcodes.NOT_FOUND, (argv, result.err)
        assert "nope" in one_error_line(result.err)
    unregistered_path = thawctl("unpin", "/tmp/not-registered.thaw")
    assert unregistered_path.code == exitcodes.NOT_FOUND
    assert "thawctl register" in one_error_line(unregistered_path.err)


def test_pin_a_path_registers_it_then_unpin_and_rm(
    thawctl: Any, thawd: Any, snapshot_file: Any
) -> None:
    result = thawctl("pin", str(snapshot_file), "--label", "pinned=by-test", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert_keys(doc, PIN_KEYS)
    assert doc["registered"] is True
    snap = doc["snapshot"]
    assert snap["name"] == "small" and snap["tier"] == "pinned"
    assert snap["resident_fraction"] == 1.0
    assert snap["checksum_state"] == "verified"
    assert snap["labels"] == {"pinned": "by-test"}
    assert doc["bytes"] == snap["size_bytes"]

    again = thawctl("pin", str(snapshot_file), "--json")  # found by path, not registered twice
    assert again.code == 0 and again.json()["registered"] is False
    assert thawctl("ls", "-q").out == "small\n"

    status = thawctl("status", "--json").json()
    assert status["pinned"]["used_bytes"] >= snap["size_bytes"]

    unpinned = thawctl("unpin", "small", "--json")
    assert unpinned.code == 0
    assert unpinned.json()["snapshot"]["tier"] == "cold"

    warm = thawctl("pin", "small", "--warm")
    assert warm.code == 0, warm.err
    assert "small is warm" in warm.out

    removed = thawctl("rm", str(snapshot_file), "--json")  # by path
    assert removed.code == 0
    assert removed.json() == {"removed": "small", "path": str(snapshot_file.resolve())}
    assert thawctl("ls", "-q").out == ""
    assert snapshot_file.exists()  # rm never deletes the file


def test_pin_prints_plain_lines_when_stdout_is_not_a_tty(thawd: Any, snapshot_file: Any) -> None:
    done = run_subprocess("pin", str(snapshot_file), env={"THAW_SOCKET": thawd.socket})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    assert done.stdout.splitlines()[0] == f"registered small: {snapshot_file.resolve()}"
    assert done.stdout.splitlines()[-1].startswith("small is pinned: ")


def test_info_of_a_registered_snapshot(thawctl: Any, thawd: Any, snapshot_file: Any) -> None:
    thawctl("pin", str(snapshot_file), "--name", "info-me")
    result = thawctl("info", "info-me", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["source"] == "daemon"
    assert_keys(doc["snapshot"], SNAPSHOT_KEYS)
    assert_keys(doc["file"], FILE_INFO_KEYS)
    assert doc["snapshot"]["tier"] == "pinned"
    assert doc["file"]["tensor_count"] == doc["snapshot"]["tensor_count"] == 4
    human = thawctl("info", "info-me").out
    assert "pinned" in human and "layers.0.index" in human and "verified" in human


def test_verify_by_name_is_done_by_thawd(thawctl: Any, thawd: Any, snapshot_file: Any) -> None:
    thawctl("register", str(snapshot_file), "--name", "v")
    result = thawctl("verify", "v", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert_keys(doc, VERIFY_KEYS)
    assert (doc["source"], doc["name"], doc["read_from"]) == ("daemon", "v", "file")
    assert doc["daemon_checksum_state"] == "verified"  # thawd recorded the outcome
    assert doc["ok"] is True and doc["bytes"] > 0
    corrupt_payload(snapshot_file, "layers.0.norm")  # a write after register: a changed file
    changed = thawctl("verify", "v")
    assert changed.code == exitcodes.SNAPSHOT_CHANGED
    assert "modified in place" in one_error_line(changed.err)
    thawctl("rm", "v")
    thawctl("register", str(snapshot_file), "--name", "v")  # damaged before it was registered
    bad = thawctl("verify", "v")
    assert bad.code == exitcodes.SNAPSHOT_CORRUPT
    assert "layers.0.norm" in one_error_line(bad.err)
    assert "CORRUPT layers.0.norm: recorded " in bad.out
    doc = thawctl("verify", "v", "--json").json()
    assert doc["ok"] is False and doc["daemon_checksum_state"] == "corrupt"
    assert [m["tensor"] for m in doc["mismatches"]] == ["layers.0.norm"]
    assert all(len(m[k]) == 16 for m in doc["mismatches"] for k in ("expected", "found"))


def test_verify_of_a_pinned_name_hashes_the_pool(
    thawctl: Any, thawd: Any, snapshot_file: Any
) -> None:
    thawctl("pin", str(snapshot_file))
    name = snapshot_file.stem
    corrupt_payload(snapshot_file, "layers.0.norm")  # the pool holds the bytes read at pin
    doc = thawctl("verify", name, "--json").json()
    assert (doc["ok"], doc["read_from"]) == (True, "pool")


def test_pin_of_a_corrupt_file_exits_7(thawctl: Any, thawd: Any, snapshot_file: Any) -> None:
    corrupt_payload(snapshot_file, "embed.weight")
    thawctl("register", str(snapshot_file), "--name", "damaged")
    result = thawctl("pin", "damaged")
    assert result.code == exitcodes.SNAPSHOT_CORRUPT, result.err
    assert "embed.weight" in one_error_line(result.err)
    record = thawctl("info", "damaged", "--json").json()["snapshot"]
    assert record["checksum_state"] == "corrupt"
    assert record["tier"] == "cold"
    assert "embed.weight" in record["error"]


def test_budget_exceeded_exits_6(thawctl: Any, own_thawd: Any, snapshot_dir: Any) -> None:
    own_thawd(pinned_budget="64KiB")
    big = write_snapshot(snapshot_dir / "big.thaw", random_tensors(0, scale=4))
    big.chmod(0o644)
    result = thawctl("pin", str(big))
    assert result.code == exitcodes.BUDGET_EXCEEDED, result.err
    line = one_error_line(result.err)
    assert "budget" in line and "pinned_budget" in line
    # `pin PATH` registered the file for the pin; the failed pin leaves thawd as it was.
    assert result.out == f"registered big: {big.resolve()}\n"
    assert line.endswith("; unregistered big again (this pin had registered it)")
    assert thawctl("ls", "-q").out == ""
    # A registered name that fails to pin stays registered: the command did not register it.
    thawctl("register", str(big))
    named = thawctl("pin", "big")
    assert named.code == exitcodes.BUDGET_EXCEEDED and "unregistered" not in named.err
    assert thawctl("ls", "-q").out == "big\n"


def test_bench_measures_every_tier_and_leaves_thawd_as_it_was(
    thawctl: Any, thawd: Any, snapshot_dir: Any
) -> None:
    result = thawctl(
        "bench", "--size", "8MiB", "--repeat", "2", "--dir", str(snapshot_dir), "--json"
    )
    assert result.code == 0, result.err
    doc = result.json()
    assert_keys(doc, BENCH_KEYS)
    assert doc["device"] == "cpu" and doc["repeat"] == 2
    tiers = {r["tier"]: r for r in doc["results"]}
    assert "daemon-pinned" in tiers, doc["skipped"]
    assert "file-warm" in tiers
    for r in doc["results"]:
        assert_keys(r, BENCH_RESULT_KEYS)
        assert r["bytes"] == 8 << 20
        assert len(r["runs_gbps"]) == 2 and r["best_gbps"] >= r["median_gbps"] > 0
    assert tiers["daemon-pinned"]["source"] == "thawd pool"
    assert {s["tier"] for s in doc["skipped"]} <= {"file-cold"}  # tmpfs cannot drop its pages
    assert thawctl("ls", "-q").out == ""  # the bench snapshot is gone again


def test_bench_of_a_registered_name(thawctl: Any, thawd: Any, snapshot_file: Any) -> None:
    thawctl("register", str(snapshot_file), "--name", "b")
    result = thawctl("bench", "b", "--repeat", "1", "--tier", "daemon-pinned")
    assert result.code == 0, result.err
    assert "daemon-pinned" in result.out and "thawd pool" in result.out
    # bench pinned it for the measurement and unpinned it after
    assert thawctl("info", "b", "--json").json()["snapshot"]["tier"] == "cold"


def test_the_socket_option_reaches_the_daemon(
    thawctl: Any, thawd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THAW_SOCKET")
    result = thawctl("--socket", thawd.socket, "status", "--json")
    assert result.code == 0
    assert result.json()["socket"] == thawd.socket
    assert os.path.exists(thawd.socket)


def test_fish_completes_snapshot_names_from_the_daemon(
    thawctl: Any, thawd: Any, snapshot_file: Any, tmp_path: Path
) -> None:
    if not shutil.which("fish"):
        pytest.skip("fish is not installed")
    assert thawctl("register", str(snapshot_file), "--name", "alpha").code == 0
    script = tmp_path / "thawctl.fish"
    script.write_text(thawctl("completion", "fish").out)
    bin_dir = tmp_path / "bin"  # `thawctl` on PATH, as an installed one would be
    bin_dir.mkdir()
    (bin_dir / "thawctl").write_text(f'#!/bin/sh\nexec {sys.executable} -m thawctl "$@"\n')
    (bin_dir / "thawctl").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        ["fish", "-c", f"source {script}; complete -C 'thawctl unpin al'"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.stdout.split() == ["alpha"], done.stderr


def test_sessions_lists_the_latest_restores_with_their_rates(
    thawctl: Any, thawd: Any, snapshot_file: Path
) -> None:
    import thaw
    from tests.daemon.conftest import random_tensors, zeros_like

    thawctl("pin", str(snapshot_file))
    with thaw.connect(thawd.socket) as client:
        client.restore(zeros_like(random_tensors(0)), snapshot_file.stem)
    result = thawctl("sessions", "--json")
    assert result.code == 0, result.err
    latest = result.json()[0]
    assert latest.keys() == {"kind", "snapshot", "pid", "uid", "bytes", "started_unix",
                             "seconds", "open", "ok", "gbps", "delivery"}  # fmt: skip
    assert (latest["kind"], latest["snapshot"], latest["open"], latest["ok"]) == (
        "restore", snapshot_file.stem, False, True)  # fmt: skip
    assert (latest["pid"], latest["uid"]) == (os.getpid(), os.getuid())
    assert latest["bytes"] > 0 and latest["gbps"] > 0 and latest["delivery"] in ("fds", "mapped")
    table = thawctl("sessions")
    assert table.code == 0 and "done" in table.out and snapshot_file.stem in table.out
