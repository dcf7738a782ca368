"""thawd trusts nobody: what its clients do to the files they name never reaches past their own
rights, and no byte a file changed after registration is served as the snapshot's.

Attacks and accidents are made for real: second uids (clients drop to them), directories
swapped for symlinks between calls, FIFOs, files replaced and modified during pins and
restores. Needs root (to run clients as other uids).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run clients as other uids")

OWNER, OTHER, ADMIN, ADMIN_GROUP = 65534, 65532, 65531, 65530


@pytest.fixture(scope="module")
def open_thawd() -> Iterator[ThawdProcess]:
    # Mode 0666: the allow-list decides who talks to it; OTHER is allowed but owns nothing.
    directory = make_dir()
    daemon = ThawdProcess(
        directory,
        socket_mode="0666",
        allow_uids=[OWNER, OTHER, ADMIN],
        admin_group=str(ADMIN_GROUP),
    ).start()
    yield daemon
    daemon.close()
    shutil.rmtree(directory, ignore_errors=True)


def owned_dir(parent: Path, name: str, uid: int = OWNER) -> Path:
    path = parent / name
    path.mkdir(mode=0o755)
    os.chown(path, uid, uid)
    return path


def client(code: str, uid: int = OWNER, groups: tuple[int, ...] = ()) -> dict[str, object]:
    """Run `code` as `uid`; it prints one JSON object last, which is returned."""
    out = run_client(code, uid=uid, groups=groups)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


OUTCOME = """
from tests.daemon.conftest import random_tensors, same, zeros_like
def outcome(fn):
    try:
        return fn()
    except thaw.errors.ThawError as e:
        return type(e).__name__
"""


# --- security -----------------------------------------------------------------------------


def test_a_directory_swapped_after_register_serves_nothing_else(open_thawd: ThawdProcess) -> None:
    base = owned_dir(open_thawd.dir, "swap-read")
    mine = owned_dir(base, "mine")
    path = write_snapshot(mine / "s.thaw", random_tensors(20))
    os.chown(path, OWNER, OWNER)
    secret = open_thawd.dir / "secret-r"
    secret.mkdir(mode=0o700)  # root's: OWNER can neither list nor read it
    write_snapshot(secret / "s.thaw", random_tensors(21))
    result = client(
        OUTCOME
        + f"""
c = thaw.client.connect({open_thawd.socket!r})
c.register({str(path)!r}, "swapr")
os.rename({str(mine)!r}, {str(base / "old")!r})
os.symlink({str(secret)!r}, {str(mine)!r})
def restore():
    out = zeros_like(random_tensors(21))
    c.restore(out, "swapr")
    return "SECRET" if same(out, random_tensors(21)) else "restored"
print(json.dumps({{"pin": outcome(lambda: c.pin("swapr") and "pinned"), "restore": outcome(restore),
                  "register": outcome(lambda: c.register({str(path)!r}, "direct").name)}}))
"""
    )
    assert result == {
        "pin": "SnapshotChanged",
        "restore": "SnapshotChanged",
        "register": "PermissionDenied",
    }
    with connect(open_thawd.socket) as c:
        assert "replaced" in c.stat("swapr").error
        c.unregister("swapr")


def test_a_directory_swapped_after_begin_freeze_writes_nothing_there(
    open_thawd: ThawdProcess,
) -> None:
    base = owned_dir(open_thawd.dir, "swap-write")
    sub = owned_dir(base, "sub")
    protected = open_thawd.dir / "protected"
    protected.mkdir(mode=0o755)  # root's (thawd's uid here): OWNER may not write in it
    victim = protected / "out.thaw"
    victim.write_bytes(b"thawd's own file, not the client's to overwrite")
    victim.chmod(0o644)
    before = (victim.stat().st_ino, victim.read_bytes())
    result = client(
        OUTCOME
        + f"""
import thaw.daemon.freezes as freezes
c = thaw.client.connect({open_thawd.socket!r})
copy = freezes._freeze_copy
def copy_then_swap(*args, **kwargs):
    begun = copy(*args, **kwargs)
    os.rename({str(sub)!r}, {str(base / "old")!r})
    os.symlink({str(protected)!r}, {str(sub)!r})
    return begun
freezes._freeze_copy = copy_then_swap
record = outcome(lambda: c.freeze(random_tensors(22), "swapw", path={str(sub / "out.thaw")!r},
                                  wait=True).path)
print(json.dumps({{"freeze": record}}))
"""
    )
    assert (victim.stat().st_ino, victim.read_bytes()) == before
    written = base / "old" / "out.thaw"  # where the directory opened at begin went
    assert result == {"freeze": str(sub / "out.thaw")}
    from thaw import restore_file

    out = zeros_like(random_tensors(22))
    restore_file(out, written)
    assert same(out, random_tensors(22))
    with connect(open_thawd.socket) as c:
        out = zeros_like(random_tensors(22))
        c.restore(out, "swapw")  # pinned: the pool holds the verified bytes
        assert same(out, random_tensors(22))
        c.unpin("swapw")
        with pytest.raises(errors.SnapshotChanged):  # its name now leads elsewhere
            c.restore(zeros_like(random_tensors(22)), "swapw")
        c.unregister("swapw")


def test_a_file_swapped_for_a_fifo_blocks_nobody(open_thawd: ThawdProcess) -> None:
    mine = owned_dir(open_thawd.dir, "fifo")
    path = write_snapshot(mine / "f.thaw", random_tensors(23))
    os.chown(path, OWNER, OWNER)
    result = client(
        OUTCOME
        + f"""
import time
c = thaw.client.connect({open_thawd.socket!r})
c.register({str(path)!r}, "fifo")
os.unlink({str(path)!r})
os.mkfifo({str(path)!r})
t0 = time.monotonic()
restored = outcome(lambda: c.restore(zeros_like(random_tensors(23)), "fifo") and "restored")
pinned = outcome(lambda: c.pin("fifo") and "pinned")
registered = outcome(lambda: c.register({str(path)!r}, "fifo2").name)
print(json.dumps({{"restore": restored, "pin": pinned, "register": registered,
                  "seconds": time.monotonic() - t0}}))
"""
    )
    assert (result["restore"], result["pin"], result["register"]) == (
        "SnapshotChanged",
        "SnapshotChanged",
        "InvalidRequest",
    )
    assert isinstance(result["seconds"], float) and result["seconds"] < 10
    with connect(open_thawd.socket, timeout=5) as c:  # and everyone else is still served
        assert "fifo" in {s.name for s in c.list()}
        c.unregister("fifo")


def test_only_the_owner_or_an_admin_changes_a_snapshot(open_thawd: ThawdProcess) -> None:
    mine = owned_dir(open_thawd.dir, "owned")
    path = write_snapshot(mine / "o.thaw", random_tensors(24))
    os.chown(path, OWNER, OWNER)
    client(f"""
c = thaw.client.connect({open_thawd.socket!r})
c.register({str(path)!r}, "owned")
c.pin("owned")
print(json.dumps({{}}))
""")
    attempts = (
        OUTCOME
        + f"""
c = thaw.client.connect({open_thawd.socket!r})
out = zeros_like(random_tensors(24))
restored = outcome(lambda: c.restore(out, "owned").name)
result = {{"restore": restored if same(out, random_tensors(24)) else "wrong bytes"}}
for op in ("verify", "unpin", "pin", "unregister"):
    result[op] = outcome(lambda: (getattr(c, op)("owned"), "done")[1])
print(json.dumps(result))
"""
    )
    other = client(attempts, uid=OTHER)
    assert other == {
        "restore": "owned",
        "verify": "PermissionDenied",
        "unpin": "PermissionDenied",
        "pin": "PermissionDenied",
        "unregister": "PermissionDenied",
    }
    with connect(open_thawd.socket) as c:
        rec = c.stat("owned")
        assert (rec.owner_uid, rec.tier) == (OWNER, "pinned")
    admin = client(attempts, uid=ADMIN, groups=(ADMIN_GROUP,))
    assert admin == {
        "restore": "owned",
        "verify": "done",
        "unpin": "done",
        "pin": "done",
        "unregister": "done",
    }


def test_a_client_of_another_uid_cannot_reopen_a_path_thawd_holds(
    open_thawd: ThawdProcess,
) -> None:
    # The same file registered by its owner is not a way in for anybody else: a register is
    # checked against the caller's own rights, whatever is registered already.
    private = owned_dir(open_thawd.dir, "private-o")
    private.chmod(0o700)
    path = write_snapshot(private / "p.thaw", random_tensors(25))
    os.chown(path, OWNER, OWNER)
    client(f"""
c = thaw.client.connect({open_thawd.socket!r})
c.register({str(path)!r}, "private-o")
print(json.dumps({{}}))
""")
    other = client(
        OUTCOME
        + f"""
c = thaw.client.connect({open_thawd.socket!r})
print(json.dumps({{"register": outcome(lambda: c.register({str(path)!r}, "mine-now").name)}}))
""",
        uid=OTHER,
    )
    assert other == {"register": "PermissionDenied"}
    with connect(open_thawd.socket) as c:
        c.unregister("private-o")


def test_posix_acls_are_honoured(open_thawd: ThawdProcess) -> None:
    import struct

    shared = open_thawd.dir / "acl"
    shared.mkdir(mode=0o700)  # root's; an ACL entry lets OTHER in, mode bits alone would not
    entries = [
        (0x01, 7, 0xFFFFFFFF),
        (0x02, 5, OTHER),
        (0x04, 0, 0xFFFFFFFF),
        (0x10, 5, 0xFFFFFFFF),
        (0x20, 0, 0xFFFFFFFF),
    ]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(shared, "system.posix_acl_access", acl)
    except OSError:
        pytest.skip("this filesystem has no POSIX ACLs")
    path = write_snapshot(shared / "a.thaw", random_tensors(26))
    code = (
        OUTCOME
        + f"""
c = thaw.client.connect({open_thawd.socket!r})
print(json.dumps({{"register": outcome(lambda: c.register({str(path)!r}).name)}}))
"""
    )
    assert client(code, uid=OTHER) == {"register": "a"}
    assert client(code, uid=OWNER) == {"register": "PermissionDenied"}
    with connect(open_thawd.socket) as c:
        c.unregister("a")


# --- silent wrong data -----------------------------------------------------------------------


def flip(path: Path, tensor: str = "layers.0.proj") -> None:
    from tests.daemon.conftest import flip_byte

    flip_byte(path, tensor, 3)


def test_a_file_modified_after_register_is_never_served(thawd_factory: object) -> None:
    daemon = thawd_factory()  # type: ignore[operator]
    tensors = random_tensors(30)
    cold, warm, pinned = (
        write_snapshot(daemon.dir / f"{n}.thaw", tensors) for n in ("cold", "warm", "pinned")
    )
    with connect(daemon.socket) as c:
        for p in (cold, warm, pinned):
            c.register(p)
        c.pin("warm", warm=True)
        c.pin("pinned")
        for p in (cold, warm, pinned):
            flip(p)
        for name in ("cold", "warm"):
            out = zeros_like(tensors)
            with pytest.raises(errors.SnapshotChanged, match="modified in place"):
                c.restore(out, name)
            assert not any(t.any() for t in out.values())  # refused before any byte moved
            assert "modified" in c.stat(name).error
        out = zeros_like(tensors)
        c.restore(out, "pinned")  # verified when pinned: still the registered bytes
        assert same(out, tensors)

        # A change during a restore, after thawd checked the file: the client's own checksums
        # refuse the damaged tensor; the model is reported half restored, never restored.
        fresh = write_snapshot(daemon.dir / "fresh.thaw", tensors)
        c.register(fresh)
        info = c._restores.open_many([{"name": "fresh"}])[0]
        flip(fresh)
        with pytest.raises(errors.RestoreIncomplete, match="checksum mismatch"):
            named = list(zeros_like(tensors).items())
            c._restores.copy_session("fresh", info, named, True, None, None)


def test_a_file_replaced_by_a_smaller_snapshot_is_refused_then_re_registered(
    thawd_factory: object,
) -> None:
    daemon = thawd_factory()  # type: ignore[operator]
    big, small = random_tensors(31, scale=4), random_tensors(32)
    path = write_snapshot(daemon.dir / "r.thaw", big)
    with connect(daemon.socket) as c:
        registered = c.register(path)
        write_snapshot(daemon.dir / "new.thaw", small)
        os.replace(daemon.dir / "new.thaw", path)
        with pytest.raises(errors.SnapshotChanged, match="replaced"):
            c.restore(zeros_like(big), "r")
        with pytest.raises(errors.SnapshotChanged):
            c.pin("r")
        rec = c.register(path, "r")  # its owner adopts the new file under the same name
        assert rec.size_bytes < registered.size_bytes and not rec.error
        out = zeros_like(small)
        c.restore(out, "r")
        assert same(out, small)


def test_a_path_alternating_between_two_snapshots_under_load(thawd_factory: object) -> None:
    daemon = thawd_factory(pinned_budget="32MiB")  # type: ignore[operator]
    one, two = random_tensors(33, scale=40), random_tensors(34, scale=40)  # ~13 MiB each
    path = write_snapshot(daemon.dir / "alt.thaw", one)
    other = write_snapshot(daemon.dir / "other.thaw", two)
    spare = daemon.dir / "spare.thaw"
    stop = threading.Event()
    seen: list[str] = []
    over: list[int] = []

    def alternate() -> None:
        while not stop.is_set():
            os.rename(path, spare)
            os.rename(other, path)
            os.rename(spare, other)

    def work(n: int) -> None:
        with connect(daemon.socket) as c:
            while not stop.is_set():
                out = zeros_like(one)
                for op, args in ((c.pin, ("alt",)), (c.restore, (out, "alt")), (c.unpin, ("alt",))):
                    try:
                        op(*args)
                        seen.append("ok")
                    except errors.ThawError as e:
                        seen.append(type(e).__name__)
                if any(t.any() for t in out.values()) and not same(out, one):
                    seen.append("WRONG BYTES")
                status = c.status()
                if status.pinned_used > status.pinned_budget:
                    over.append(status.pinned_used)

    with connect(daemon.socket) as c:
        c.register(path, "alt")
        threads = [threading.Thread(target=alternate)]
        threads += [threading.Thread(target=work, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        assert set(seen) <= {"ok", "SnapshotChanged", "InvalidRequest"} and not over, set(seen)
        assert "SnapshotChanged" in seen
        assert c.status().pinned_used == 0 or c.stat("alt").tier == "pinned"
    assert "Traceback" not in daemon.log.read_text()


def test_concurrent_pins_of_one_snapshot_stay_inside_the_budget(thawd_factory: object) -> None:
    daemon = thawd_factory(pinned_budget="32MiB")  # type: ignore[operator]
    path = write_snapshot(daemon.dir / "p.thaw", random_tensors(35, scale=40))
    outcomes: list[str] = []
    with connect(daemon.socket) as c:
        c.register(path, "p")
        barrier = threading.Barrier(8)

        def pin() -> None:
            with connect(daemon.socket) as mine:
                barrier.wait()
                try:
                    mine.pin("p")
                    outcomes.append("pinned")
                except errors.InvalidRequest as e:
                    outcomes.append("busy" if "already pinning" in str(e) else str(e))

        threads = [threading.Thread(target=pin) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = c.status()
        assert status.pinned_used <= status.pinned_budget
        assert set(outcomes) <= {"pinned", "busy"} and "pinned" in outcomes
        assert c.stat("p").tier == "pinned"
