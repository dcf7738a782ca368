"""Requests that cost thawd more than they should: each is refused at the edge with
INVALID_ARGUMENT (or a snapshot error) and one log line, and nobody else waits for it."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest

from tests.daemon.conftest import ThawdProcess, random_tensors, write_snapshot
from thaw import _native, errors
from thaw._proto import thawd_pb2 as pb
from thaw.client import connect
from thaw.daemon import fdsocket


def rss_peak(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_manifest_bomb_costs_thawd_nothing(thawd: ThawdProcess) -> None:
    from tests.format_spec import HEADER

    path = write_snapshot(thawd.dir / "bomb.thaw", random_tensors(40))
    with open(path, "rb") as f:
        head = HEADER.unpack(f.read(HEADER.size))
        fields = dict(
            zip(
                (
                    "magic",
                    "version",
                    "flags",
                    "header_size",
                    "alignment",
                    "payload_offset",
                    "payload_length",
                    "manifest_offset",
                    "manifest_length",
                    "file_length",
                    "manifest_checksum",
                    "header_checksum",
                ),
                head,
                strict=True,
            )
        )
        f.seek(fields["manifest_offset"])
        manifest = json.loads(f.read(fields["manifest_length"]))
    manifest["tensors"] = []
    blob = (
        json.dumps(manifest)
        .encode()
        .replace(b'"tensors": []', b'"tensors": [' + b"{}," * 10_000_000 + b"{}]")
    )
    with open(path, "r+b") as f:
        f.seek(fields["manifest_offset"])
        f.write(blob)
        f.truncate(fields["manifest_offset"] + len(blob))
        fields.update(
            manifest_length=len(blob),
            file_length=fields["manifest_offset"] + len(blob),
            manifest_checksum=_native.xxh3(blob),
            header_checksum=0,
        )
        raw = HEADER.pack(*fields.values())[:-8]
        f.seek(0)
        f.write(raw + _native.xxh3(raw).to_bytes(8, "little"))
    before = rss_peak(thawd.pid)
    with connect(thawd.socket) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.SnapshotCorrupt, match="JSON objects and arrays"):
            c.register(path, "bomb")
        assert time.monotonic() - t0 < 5
        assert c.list() == []
    # The 30 MB manifest is read once; 10 million dicts (~700 MB) are never built.
    assert rss_peak(thawd.pid) - before < 150 << 20


def test_begin_freeze_is_bounded_and_answered_beside_other_clients(
    thawd_factory: object,
) -> None:
    daemon = thawd_factory(pinned_budget="4GiB")  # type: ignore[operator]
    with connect(daemon.socket) as c:

        def begin(tensors: list[pb.TensorSpec]) -> pb.BeginFreezeResponse:
            return c._conn.call("BeginFreeze", pb.BeginFreezeRequest(name="many", tensors=tensors))

        too_many = [pb.TensorSpec(name=f"t{i}", dtype="float32", shape=[1]) for i in range(300_000)]
        with pytest.raises(errors.InvalidRequest, match="at most 262144"):
            begin(too_many)
        for bad, phrase in (
            ([pb.TensorSpec(name="deep", dtype="float32", shape=[1] * 17)], "17 dims"),
            ([pb.TensorSpec(name="n" * 2000, dtype="float32", shape=[1])], "1 to 1024"),
            ([pb.TensorSpec(name="huge", dtype="float32", shape=[1 << 50])], r"2\^48"),
            ([pb.TensorSpec(name="odd", dtype="float128", shape=[1])], "unknown dtype"),
            ([pb.TensorSpec(name="twice", dtype="int8", shape=[1])] * 2, "appears twice"),
            ([], "at least one tensor"),
        ):
            with pytest.raises(errors.InvalidRequest, match=phrase):
                begin(bad)

        with pytest.raises(errors.InvalidRequest, match="fingerprint_json of"):
            c._conn.call("BeginFreeze", pb.BeginFreezeRequest(
                name="fp", tensors=[pb.TensorSpec(name="t", dtype="int8", shape=[1])],
                fingerprint_json='{"model": "' + "m" * (2 << 20) + '"}'))  # fmt: skip

        # 200,000 tensors are allowed; their layout runs on a thread while others are served.
        many = [pb.TensorSpec(name=f"t{i}", dtype="int8", shape=[1]) for i in range(200_000)]
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with connect(daemon.socket) as other:
                while not done.is_set():
                    t0 = time.monotonic()
                    other.status()
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.01)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            begun = begin(many)
        finally:
            done.set()
            prober.join()
        assert len(begun.tensors) == 200_000
        c._conn.call("AbortFreeze", pb.AbortFreezeRequest(session_id=begun.session_id))
        assert latencies and max(latencies) < 1.0, max(latencies)
    assert "Traceback" not in daemon.log.read_text()


def test_fd_socket_numbers_out_of_range_are_refused(thawd: ThawdProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(fdsocket.fd_socket_path(thawd.socket))
    with sock:
        replies = []
        for raw in (
            b'{"op":"pool","start":1e400}',
            b'{"op":"pool","start":-1}',
            b'{"op":"pool","start":1.5}',
            b'{"op":"pool","start":0,"count":1e400}',
            b'{"op":"pool","start":0,"count":254}',
            b'{"op":"auth"}',
        ):
            sock.send(raw)
            replies.append(fdsocket.recv(sock)[0])
        token_reply = replies.pop()
        sock.send(
            json.dumps({"op": "close", "sessions": [{"id": "x", "ok": True}]})
            .encode()
            .replace(b'"ok": true', b'"ok": true, "bytes": 1e400')
        )
        replies.append(fdsocket.recv(sock)[0])
        sock.send(b'{"op":"close","sessions":[{"id":"x","ok":true,"seconds":1e400}]}')
        replies.append(fdsocket.recv(sock)[0])
        sock.send(b'{"op":"fd","session":12}')
        replies.append(fdsocket.recv(sock)[0])
        sock.send(b'{"op":"auth"}')  # the connection still answers
        again = fdsocket.recv(sock)[0]
    assert token_reply["ok"] and again["ok"]
    assert [(r["ok"], r["error"]) for r in replies] == [(False, "InvalidRequest")] * 8
    for r in replies:
        assert "must be" in r["message"]
    assert "Traceback" not in thawd.log.read_text()


def test_a_flood_of_bad_requests_is_a_few_log_lines(thawd: ThawdProcess) -> None:
    with connect(thawd.socket) as c:
        for i in range(200):
            with pytest.raises(errors.InvalidRequest):
                c._conn.call("Stat", pb.StatRequest(name=f"bad name {i}"))
        with pytest.raises(grpc.RpcError):  # and a raw call the client library would not make
            c._conn._grpc().Pin(
                pb.PinRequest(name="x", tier=7),  # type: ignore[arg-type]
                metadata=c._conn.metadata(),
                timeout=5,
            ).next()
    time.sleep(0.2)
    log = thawd.log.read_text()
    refusals = [line for line in log.splitlines() if "refused request" in line]
    assert 1 <= len(refusals) <= 20, len(refusals)  # the throttle's burst per 10 s
    assert "Traceback" not in log


def test_open_sessions_and_watch_streams_are_bounded(thawd: ThawdProcess) -> None:
    from thawd.restores import MAX_SESSIONS
    from thawd.service import MAX_WATCHES

    path = write_snapshot(thawd.dir / "s.thaw", random_tensors(41))
    with connect(thawd.socket) as c:
        c.register(path, "s")
        c.pin("s")
        # Each session may hold fds of thawd's: one connection holds at most MAX_SESSIONS.
        opened = [c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="s"))
                  for _ in range(MAX_SESSIONS)]  # fmt: skip
        with pytest.raises(errors.InvalidRequest, match=f"{MAX_SESSIONS} restore and freeze"):
            c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="s"))
        with connect(thawd.socket) as other:  # another connection is not held back
            other.restore({k: v.clone() for k, v in random_tensors(41).items()}, "s")
        c._conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=opened[0].session_id))
        c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="s"))  # room again
        # Watch streams: at most MAX_WATCHES per uid, each at most 5 updates a second.
        stub, metadata = c._conn._grpc(), c._conn.metadata()
        streams = [stub.Watch(pb.WatchRequest(interval_s=0.001), metadata=metadata)
                   for _ in range(MAX_WATCHES)]  # fmt: skip
        try:
            for s in streams:
                next(s)  # each is open and answering
            extra = c._conn._grpc().Watch(pb.WatchRequest(), metadata=c._conn.metadata(), timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                next(extra)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"{MAX_WATCHES} Watch streams" in (info.value.details() or "")
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 1.0:
                if next(streams[0]).HasField("metrics"):
                    n += 1
            assert n <= 6  # asked for every millisecond, given every 0.2 s
        finally:
            for s in streams:
                s.cancel()
