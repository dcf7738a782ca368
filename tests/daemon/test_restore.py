"""Restores and freezes through a real daemon: pinned, warm and cold tiers, many clients."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import thaw
from tests.daemon.conftest import (
    ROOT,
    ThawdProcess,
    flip_byte,
    random_tensors,
    same,
    write_snapshot,
    zeros_like,
)
from thaw import errors
from thaw.client import connect
from thaw.daemon import fdsocket
from thaw.daemon.records import Event, Metrics


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_concurrent_processes_restore_bit_identically(module_thawd: ThawdProcess) -> None:
    tensors = random_tensors(10, scale=8)
    path = write_snapshot(module_thawd.dir / "many.thaw", tensors)
    with connect(module_thawd.socket) as c:
        c.register(path, "many")
        rec = c.pin("many")
        assert (rec.tier, rec.checksum_state) == ("pinned", "verified")
    code = f"""
sys.path.insert(0, {str(ROOT)!r})
from tests.daemon.conftest import random_tensors, zeros_like
from tests.daemon.test_restore import digest
c = thaw.client.connect({module_thawd.socket!r})
out = zeros_like(random_tensors(10, scale=8))
results = [c.restore(out, "many").tier for _ in range(3)]
print(json.dumps({{"digest": digest(out), "tiers": results}}))
"""
    prelude = (
        f"import os, sys, json\nsys.path.insert(0, {str(ROOT)!r})\nimport torch, thaw.client\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    expected = digest(tensors)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {"digest": expected, "tiers": ["pinned"] * 3}
    with connect(module_thawd.socket) as c:
        rec = c.stat("many")
        assert rec.restores == 12 and rec.clients == 0


def test_freeze_then_restore(module_thawd: ThawdProcess) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48))
    with connect(module_thawd.socket) as c:
        rec = c.freeze(model, "frozen", labels={"by": "test"})
        assert rec.tier == "pinned"  # checksums and the file come behind the client
        target = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48))
        c.restore(target, "frozen")
        assert same(dict(target.state_dict()), dict(model.state_dict()))
        deadline = time.monotonic() + 20
        while c.stat("frozen").file_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        rec = c.stat("frozen")
        assert os.path.exists(rec.path) and not rec.file_pending
        assert isinstance(rec.file_bytes, int) and rec.file_bytes > 0
        assert rec.checksum_state == "verified"
        from_file = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48))
        thaw.restore_file(from_file, rec.path)  # verifies the checksums the daemon computed
        assert same(dict(from_file.state_dict()), dict(model.state_dict()))
        from thaw.format import open_snapshot

        assert {t.name for t in open_snapshot(rec.path).tensors} == set(model.state_dict())
        with pytest.raises(errors.AlreadyExists):
            c.freeze(model, "frozen")


def test_warm_and_cold_restores(module_thawd: ThawdProcess) -> None:
    tensors = random_tensors(3)
    path = write_snapshot(module_thawd.dir / "w.thaw", tensors)
    with connect(module_thawd.socket) as c:
        c.register(path, "w")
        out = zeros_like(tensors)
        assert c.restore(out, "w").tier == "cold" and same(out, tensors)
        rec = c.pin("w", warm=True)
        assert rec.tier == "warm" and rec.resident_bytes == rec.size_bytes
        out = zeros_like(tensors)
        assert c.restore(out, "w").tier == "warm" and same(out, tensors)
        assert c.status().warm_used >= rec.size_bytes


def test_restore_deliveries_on_a_memfd_pool(module_thawd: ThawdProcess) -> None:
    """A client that maps the pool buffer already gets no fds again; asking for no shared
    memory (CUDA IPC mode) on a host without a VMM pool gets the file; the daemon refuses a
    daemon copy it cannot make."""
    from thaw._proto import thawd_pb2 as pb

    tensors = random_tensors(4)
    path = write_snapshot(module_thawd.dir / "modes.thaw", tensors)
    with connect(module_thawd.socket) as c:
        c.register(path, "modes")
        c.pin("modes")
        deliveries = []
        for _ in range(2):  # the second restore reuses the mapping of the first
            out = zeros_like(tensors)
            result = c.restore(out, "modes")
            assert result.tier == "pinned" and same(out, tensors)
            deliveries.append(result.delivery)
        assert deliveries == ["fds", "mapped"]
        buffer_id = c._restores._mappings["modes"][0]
        conn = c._conn
        request = pb.OpenRestoreRequest(name="modes", mapped_buffer=buffer_id)
        again = conn.call("OpenRestore", request)
        assert (again.delivery, again.buffer_id) == (pb.DELIVERY_MAPPED, buffer_id)
        with pytest.raises(errors.NotFound):  # nothing waits on the fd socket
            c._conn.redeem(again.session_id)
        c._conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=again.session_id, ok=False))

        no_share = conn.call("OpenRestore", pb.OpenRestoreRequest(name="modes", daemon_copy=True))
        assert (no_share.delivery, no_share.pool_kind) == (pb.DELIVERY_FDS, pb.POOL_KIND_FILE)
        with pytest.raises(errors.InvalidRequest, match="VMM pool"):
            c._conn.call("CopyInto", pb.DaemonCopyRequest(session_id=no_share.session_id))
        conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=no_share.session_id, ok=False))

        begin = c._conn.call(
            "BeginFreeze",
            pb.BeginFreezeRequest(
                name="modes-out",
                tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[4])],
                daemon_copy=True,
            ),
        )
        with pytest.raises(errors.InvalidRequest, match="VMM pool"):
            c._conn.call("CopyOut", pb.DaemonCopyRequest(session_id=begin.session_id))
        c._conn.call("AbortFreeze", pb.AbortFreezeRequest(session_id=begin.session_id))

        for mode in ("daemon_copy", "ipc"):  # "ipc": the mode's older name
            with pytest.raises(errors.InvalidRequest, match="CUDA tensors only"):
                c.restore(zeros_like(tensors), "modes", mode=mode)
        with pytest.raises(errors.InvalidRequest, match="restore mode 'fast'"):
            c.restore(zeros_like(tensors), "modes", mode="fast")
        assert c.stat("modes").clients == 0

        # Confirmations go on the fd socket; unknown and malformed ones are refused by name.
        reply, _ = c._conn.fd_call({"op": "close", "sessions": [{"id": "nope", "ok": True}]})
        assert (reply["ok"], reply["error"]) == (False, "NotFound")
        reply, _ = c._conn.fd_call({"op": "close", "sessions": "nope"})
        assert (reply["ok"], reply["error"]) == (False, "InvalidRequest")
        assert "sessions must be a list" in reply["message"]

        # A memfd pool is not one to map whole: no pool in the auth reply, "pool" refused.
        assert c._conn._pool is None and not c.map_pool(0)
        sock = fdsocket.connect(fdsocket.fd_socket_path(module_thawd.socket))
        with sock:
            fdsocket.send(sock, {"op": "pool", "start": 0})
            reply, fds = fdsocket.recv(sock)
            fdsocket.send(sock, {"op": "pool", "start": [0]})  # not a number
            bad, bad_fds = fdsocket.recv(sock)
        assert (reply["ok"], reply["error"], fds) == (False, "InvalidRequest", [])
        assert "shares no VMM pool" in reply["message"]
        assert (bad["ok"], bad["error"], bad_fds) == (False, "InvalidRequest", [])
        assert "start must be an integer" in bad["message"]
        # A pool id the daemon does not have changes nothing: the buffer's fds, as before.
        c.forget("modes")
        opened = c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="modes", pool_id=12345))
        assert opened.delivery == pb.DELIVERY_FDS
        c._conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=opened.session_id, ok=False))
        c.unpin("modes")
        assert c.restore(zeros_like(tensors), "modes").delivery == "file"


def test_memory_under_an_open_restore_is_not_dropped(module_thawd: ThawdProcess) -> None:
    """Unpin and unregister wait for open restores: a pool buffer's memory goes back to the
    pool, and another pin could overwrite it under a client still copying from it."""
    from thaw._proto import thawd_pb2 as pb

    tensors = random_tensors(5)
    path = write_snapshot(module_thawd.dir / "held.thaw", tensors)
    with connect(module_thawd.socket) as c:
        c.register(path, "held")
        c.pin("held")
        opened = c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="held"))
        with pytest.raises(errors.InvalidRequest, match=r"busy \(1 restore\(s\) open\)"):
            c.unpin("held")
        with pytest.raises(errors.InvalidRequest, match="busy"):
            c.unregister("held")
        assert c.stat("held").tier == "pinned"
        c._restores.close_sessions([{"id": opened.session_id, "ok": False, "error": "test"}])
        assert c.unpin("held").tier == "cold"
        c.unregister("held")


def test_restore_many_overlaps_the_control_calls(module_thawd: ThawdProcess) -> None:
    sets = {f"many{i}": random_tensors(20 + i) for i in range(3)}
    with connect(module_thawd.socket) as c:
        for name, tensors in sets.items():
            c.register(write_snapshot(module_thawd.dir / f"{name}.thaw", tensors), name)
        c.pin("many0")  # pinned, warm and cold in one batch
        c.pin("many1", warm=True)
        outs = {name: zeros_like(t) for name, t in sets.items()}
        results = c.restore_many([(outs[n], n) for n in sets])
        assert [(r.name, r.tier) for r in results] == [
            ("many0", "pinned"),
            ("many1", "warm"),
            ("many2", "cold"),
        ]
        assert all(same(outs[n], sets[n]) for n in sets)
        # The second fails its checks: the first is restored and confirmed, the third is not.
        wrong = {k: torch.zeros(3) for k in sets["many1"]}
        with pytest.raises(errors.TensorMismatch) as info:
            c.restore_many(
                [
                    (zeros_like(sets["many0"]), "many0"),
                    (wrong, "many1"),
                    (zeros_like(sets["many2"]), "many2"),
                ]
            )
        assert "before it: 'many0'" in "".join(info.value.__notes__)
        records = {n: c.stat(n) for n in sets}
        assert {n: r.restores for n, r in records.items()} == {"many0": 2, "many1": 1, "many2": 1}
        assert all(r.clients == 0 for r in records.values())
        with pytest.raises(errors.NotFound):  # nothing stays open when one does not exist
            c.restore_many([(zeros_like(sets["many0"]), "many0"), ({}, "nope")])
        assert c.stat("many0").clients == 0


def test_restores_open_on_the_fd_socket(module_thawd: ThawdProcess) -> None:
    """Restores open with one packet on the fd socket. Malformed or unauthenticated opens are
    refused by name; a batch whose manifests do not fit a packet opens nothing there and the
    client opens it over gRPC instead."""
    from thaw.daemon.opened import Opened

    def encoded(*names: str) -> list[dict[str, object]]:
        return [{"name": n} for n in names]

    small = random_tensors(40)
    # 1500 tensors with long names: a manifest of ~100 KB, over the 64 KiB packet.
    large = {
        f"model.layers.{i}.a_rather_long_parameter_name.weight": torch.full((2,), float(i))
        for i in range(1500)
    }
    with connect(module_thawd.socket) as c:
        c.register(write_snapshot(module_thawd.dir / "fd-small.thaw", small), "fd-small")
        c.register(write_snapshot(module_thawd.dir / "fd-large.thaw", large), "fd-large")
        reply, _ = c._conn.fd_call({"op": "open", "restores": encoded("fd-small")})
        assert reply["ok"] and len(reply["opened"]) == 1
        opened = Opened(reply["opened"][0])
        assert {t.name for t in opened.tensors} == set(small) and opened.session_id
        assert opened.tier == "cold" and opened.pool_kind == "file"
        assert c.stat("fd-small").clients == 1
        c._restores.close_sessions([{"id": opened.session_id, "ok": False, "error": "test"}])
        assert c.stat("fd-small").clients == 0

        for restores, error, says in (
            (encoded("nope"), "NotFound", "no snapshot named 'nope'"),
            ("fd-small", "InvalidRequest", "a list of 1 to 64"),
            ([], "InvalidRequest", "a list of 1 to 64"),
            (encoded("fd-small") * 65, "InvalidRequest", "a list of 1 to 64"),
            (["CghmZC1zbWFsbA=="], fdsocket.TOO_LARGE, "open over gRPC"),  # before JSON
            ([{"name": "fd-small"}, "fd-small"], "InvalidRequest", "a list of 1 to 64"),
            ([{"name": "fd-small", "size": 1}], "InvalidRequest", "unknown field(s) ['size']"),
            ([{"name": 7}], "InvalidRequest", "name must be a string"),
            ([{"name": "fd-small", "pool_id": -1}], "InvalidRequest", "pool_id must be"),
            ([{"name": "fd-small", "pool_id": 1 << 64}], "InvalidRequest", "pool_id must be"),
            ([{"name": "fd-small", "daemon_copy": 1}], "InvalidRequest", "true or false"),
            (encoded("fd-small", "fd-large"), fdsocket.TOO_LARGE, "open over gRPC"),
        ):
            reply, _ = c._conn.fd_call({"op": "open", "restores": restores})
            assert (reply["ok"], reply["error"]) == (False, error), reply
            assert says in reply["message"]
        # A batch that fails part way leaves nothing open.
        reply, _ = c._conn.fd_call({"op": "open", "restores": encoded("fd-small", "nope")})
        assert reply["error"] == "NotFound" and c.stat("fd-small").clients == 0

        out = {k: torch.zeros_like(v) for k, v in large.items()}
        assert c.restore(out, "fd-large").bytes == 1500 * 8  # opened over gRPC
        assert all(torch.equal(out[k], large[k]) for k in large)
        assert c.stat("fd-large").clients == 0

        # A thawd from before the JSON open says nothing of it at auth: its restores open over
        # gRPC, as this one's do when told so.
        assert c._conn.opens_json
        c._conn.opens_json = False
        out = {k: torch.zeros_like(v) for k, v in small.items()}
        assert c.restore(out, "fd-small").tier == "cold"
        assert all(torch.equal(out[k], small[k]) for k in small)
        assert c.stat("fd-small").clients == 0

    sock = fdsocket.connect(fdsocket.fd_socket_path(module_thawd.socket))
    with sock:  # a connection that never authenticated opens nothing
        fdsocket.send(sock, {"op": "open", "restores": encoded("fd-small")})
        reply, _ = fdsocket.recv(sock)
    assert (reply["ok"], reply["error"]) == (False, "PermissionDenied")
    assert "authenticate this connection first" in reply["message"]


def test_a_stopping_thawd_opens_no_restore(thawd: ThawdProcess) -> None:
    """While thawd drains (SIGTERM, restores still open), the fd socket opens nothing new."""
    c = connect(thawd.socket)
    c.register(write_snapshot(thawd.dir / "d.thaw", random_tensors(42)), "d")
    request = {"op": "open", "restores": [{"name": "d"}]}
    assert c._conn.fd_call(request)[0]["ok"]  # an open restore: the drain waits for it
    os.kill(thawd.pid, signal.SIGTERM)
    deadline = time.monotonic() + 1.5  # within drain_grace_s (2 s)
    reply = c._conn.fd_call(request)[0]
    while reply["ok"] and time.monotonic() < deadline:
        time.sleep(0.02)
        reply = c._conn.fd_call(request)[0]
    assert (reply["ok"], reply["error"]) == (False, "DaemonUnavailable")
    assert "thawd is stopping" in reply["message"]
    assert thawd.proc is not None
    thawd.proc.wait(timeout=30)
    c.close()


def test_a_client_restores_again_after_thawd_restarts(thawd: ThawdProcess) -> None:
    """The restart ends the client's fd-socket connection: its next restore connects anew."""
    tensors = random_tensors(41)
    path = write_snapshot(thawd.dir / "r.thaw", tensors)
    with connect(thawd.socket) as c:
        c.register(path, "r")
        c.pin("r")
        c.restore(zeros_like(tensors), "r")
        thawd.restart()
        out = zeros_like(tensors)
        assert c.restore(out, "r").tier == "pinned" and same(out, tensors)


def test_mismatch_is_refused_before_any_copy(module_thawd: ThawdProcess) -> None:
    tensors = random_tensors(4)
    path = write_snapshot(module_thawd.dir / "mm.thaw", tensors)
    with connect(module_thawd.socket) as c:
        c.register(path, "mm")
        wrong = zeros_like(tensors)
        wrong["layers.0.proj"] = torch.zeros(96, 129)
        with pytest.raises(errors.TensorMismatch) as info:
            c.restore(wrong, "mm")
        assert info.value.tensor == "layers.0.proj"
        assert all(not t.any() for t in wrong.values())
        assert c.stat("mm").clients == 0  # the session was closed as failed


def test_corrupt_snapshot_refused_at_pin_naming_the_tensor(module_thawd: ThawdProcess) -> None:
    tensors = random_tensors(5)
    path = write_snapshot(module_thawd.dir / "bad.thaw", tensors)
    flip_byte(path, "layers.0.proj", 100)
    with connect(module_thawd.socket) as c:
        c.register(path, "bad")
        with pytest.raises(errors.SnapshotCorrupt) as info:
            c.pin("bad")
        assert info.value.tensor == "layers.0.proj"
        assert "layers.0.proj" in str(info.value)
        rec = c.stat("bad")
        assert (rec.tier, rec.checksum_state) == ("cold", "corrupt")
        assert "layers.0.proj" in rec.error


def test_verify_rechecks_the_pool_and_the_file(module_thawd: ThawdProcess) -> None:
    path = write_snapshot(module_thawd.dir / "checked.thaw", random_tensors(8))
    with connect(module_thawd.socket) as c:
        c.register(path, "checked")
        cold = c.verify("checked")
        assert (cold.source, cold.snapshot.checksum_state) == ("file", "verified")
        assert cold.bytes == c.stat("checked").size_bytes > 0
        c.pin("checked")
        assert c.verify("checked").source == "pool"
        c.unpin("checked")
        # Damage on disk that no write through the filesystem made (bit rot keeps mtime and
        # ctime): a file damaged before it was registered is the same bytes thawd reads.
        rotten = write_snapshot(module_thawd.dir / "rotten.thaw", random_tensors(8))
        flip_byte(rotten, "layers.0.proj", 7)
        c.register(rotten, "rotten")
        with pytest.raises(errors.SnapshotCorrupt) as info:
            c.verify("rotten")
        assert info.value.tensor == "layers.0.proj"
        rec = c.stat("rotten")
        assert rec.checksum_state == "corrupt" and "layers.0.proj" in rec.error
        with pytest.raises(errors.NotFound):
            c.verify("no-such-snapshot")


def test_watch_streams_events_and_metrics(module_thawd: ThawdProcess) -> None:
    path = write_snapshot(module_thawd.dir / "watched.thaw", random_tensors(6))
    with connect(module_thawd.socket) as c:
        stream = c.watch(interval_s=0.2)
        first = next(stream)
        assert isinstance(first, Metrics) and first.status.pool_kind == "memfd"
        c.register(path, "watched")
        kinds = []
        for item in stream:
            if isinstance(item, Event):
                kinds.append((item.kind, item.snapshot))
                if item.kind == "registered":
                    break
        stream.close()
        assert ("registered", "watched") in kinds


def test_a_stopped_thawd_is_a_clear_error_not_a_hang(thawd: ThawdProcess) -> None:
    """A stopped (or stuck) thawd accepts connections but answers nothing: connecting and
    calling give up after the client's timeout, saying so."""
    c = connect(thawd.socket, timeout=1)
    os.kill(thawd.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.DaemonUnavailable, match="did not answer on its fd socket"):
            connect(thawd.socket, timeout=1)
        with pytest.raises(errors.DaemonUnavailable, match="did not answer in time"):
            c.status()
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(thawd.pid, signal.SIGCONT)
    assert c.status().version  # and it serves again once it runs
    c.close()


def test_an_fd_socket_without_grpc_is_a_clear_error(thawd: ThawdProcess) -> None:
    """The gRPC socket's file is gone (removed by hand, another daemon's cleanup) while thawd
    still answers its fd socket: connect() says which half failed, after its timeout."""
    os.unlink(thawd.socket)
    t0 = time.monotonic()
    with pytest.raises(errors.DaemonUnavailable, match="accepted the fd socket but not gRPC"):
        connect(thawd.socket, timeout=1)
    assert time.monotonic() - t0 < 10


def test_daemon_killed_mid_restore_is_never_a_success(thawd: ThawdProcess) -> None:
    tensors = random_tensors(7)
    path = write_snapshot(thawd.dir / "k.thaw", tensors)
    c = connect(thawd.socket, timeout=5)
    c.register(path, "k")
    c.pin("k")

    def kill(done: int, total: int) -> None:
        if done == 0:  # the fd is mapped, the copy has not started: kill the daemon now
            os.kill(thawd.pid, signal.SIGKILL)
            assert thawd.proc is not None
            thawd.proc.wait()

    with pytest.raises(errors.DaemonError) as info:
        c.restore(zeros_like(tensors), "k", progress=kill)
    assert isinstance(info.value, errors.DaemonUnavailable)
    assert "restore again" in str(info.value)
    with pytest.raises(errors.DaemonUnavailable):
        c.status()
    c.close()


def test_sessions_show_who_restores_what(thawd: ThawdProcess) -> None:
    """ListSessions: an open session with its pid, uid and size; ended restores with what the
    client copied, how long it took and whether it was confirmed; the watch stream's metrics
    carry the same."""
    from thaw._proto import thawd_pb2 as pb

    tensors = random_tensors(60)
    path = write_snapshot(thawd.dir / "w.thaw", tensors)
    with connect(thawd.socket) as c:
        c.register(path, "w")
        c.restore(zeros_like(tensors), "w")
        opened = c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="w"))
        sessions = c.sessions()
        now_open, ended = sessions[0], sessions[1]
        assert (now_open.open, now_open.kind, now_open.snapshot) == (True, "restore", "w")
        assert (now_open.pid, now_open.uid) == (os.getpid(), os.getuid())
        assert now_open.bytes == c.stat("w").size_bytes and now_open.seconds >= 0
        assert (ended.open, ended.ok, ended.snapshot) == (False, True, "w")
        assert ended.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert isinstance(ended.gbps, float) and ended.gbps > 0
        c._conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=opened.session_id,
                                                            ok=False, error="gave up"))  # fmt: skip
        time.sleep(0.1)  # the record of an ended session is made just after the reply
        failed = c.sessions()[0]
        assert (failed.open, failed.ok) == (False, False)
        metrics = next(u for u in c.watch(0.2) if isinstance(u, Metrics))
        assert [s.ok for s in metrics.sessions[:2]] == [False, True]
