"""thawd after a crash and on a full disk: no name stays blocked by a write that never
finished, no temporary file piles up, and pinned memory can always be given back."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import ThawdProcess, make_dir, random_tensors, same, zeros_like
from thaw import errors
from thaw.client import connect


def test_a_killed_freeze_leaves_its_name_free_and_no_temporaries(thawd: ThawdProcess) -> None:
    with connect(thawd.socket) as c:
        c.freeze(random_tensors(50), "kept", wait=True)
    thawd.stop()
    # What a thawd killed in the middle of a write leaves: its row still "writing" and, where
    # the filesystem had no O_TMPFILE, a temporary file in its snapshot directory.
    registry = thawd.dir / "state" / "registry.sqlite3"
    with contextlib.closing(sqlite3.connect(registry)) as db, db:
        db.execute(
            "INSERT INTO snapshots (name, path, labels, wanted_tier, checksum_state, "
            "error, owner_uid, registered, state) VALUES ('lost', ?, '{}', 'pinned', "
            "'unverified', '', 0, 1.0, 'writing')",
            (str(thawd.dir / "state" / "snapshots" / "lost.thaw"),),
        )
    stale = thawd.dir / "state" / "snapshots" / ".lost.thaw.0123456789ab.tmp"
    stale.write_bytes(b"half a snapshot")
    thawd.start()
    with connect(thawd.socket) as c:
        assert {s.name: s.tier for s in c.list()} == {"kept": "pinned"}
        assert not stale.exists()
        c.freeze(random_tensors(51), "lost", wait=True)  # the name is free again
        out = zeros_like(random_tensors(51))
        c.restore(out, "lost")
        assert same(out, random_tensors(51))
    assert "thawd stopped while writing" in thawd.log.read_text()


def test_thawd_killed_right_after_a_commit(thawd: ThawdProcess) -> None:
    tensors = random_tensors(52, scale=64)  # ~5 MB: the write takes a moment
    with connect(thawd.socket) as c:
        c.freeze(tensors, "racing")  # returns before the file is written
    thawd.kill()
    thawd.start()
    snapshots = thawd.dir / "state" / "snapshots"
    with connect(thawd.socket) as c:
        names = {s.name for s in c.list()}
        if names:  # the write won the race: a complete, verified snapshot
            assert names == {"racing"}
            out = zeros_like(tensors)
            c.restore(out, "racing")
            assert same(out, tensors)
        else:  # it lost: nothing of it is left, and the name is free
            c.freeze(tensors, "racing", wait=True)
    assert not [p for p in snapshots.iterdir() if p.name.endswith(".tmp")]


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    directory = make_dir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()


def fill(directory: Path) -> Path:
    """Use up every free byte of the filesystem holding `directory`."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (64 << 10))
            f.flush()
    return filler


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_never_holds_pinned_memory(thawd_factory: object) -> None:
    with small_tmpfs("4m") as state:
        daemon: ThawdProcess = thawd_factory(state_dir=str(state))  # type: ignore[operator]
        tensors = random_tensors(53, scale=16)  # ~1.3 MB payload, more than is left
        filler = fill(state)
        with connect(daemon.socket) as c:
            # Path-less: its file goes to the state directory, which has no room.
            with pytest.raises(errors.DaemonError, match="could not be written"):
                c.freeze(tensors, "nospace", wait=True)
            rec = c.stat("nospace")
            assert (rec.tier, rec.file_pending) == ("pinned", False)
            assert "in memory only" in rec.error
            out = zeros_like(tensors)
            c.restore(out, "nospace")  # still served from the pool meanwhile
            assert same(out, tensors)
            c.unpin("nospace")  # the registry cannot be written: memory goes anyway
            status = c.status()
            assert status.pinned_used == 0
            c.unregister("nospace")
            assert c.list() == []
            assert "full" in status.registry_error and status.registry_unsaved >= 1
            filler.unlink()  # space comes back; the registry catches up
            deadline = time.monotonic() + 10
            while c.status().registry_unsaved and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.status().registry_unsaved == 0 and not c.status().registry_error
            c.freeze(tensors, "written", wait=True)
        daemon.stop()
        daemon.start()
        with connect(daemon.socket) as c:
            assert [s.name for s in c.list()] == ["written"]
        daemon.stop()
