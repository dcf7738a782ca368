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
    assert [(r["ok"], r["error"]) for r in replies] == [(False, "InvalidRequest")] * 6
    for r in replies:
        assert "must be" in r["message"]
    assert "Traceback" not in thawd.log.read_text()


def test_a_flood_of_bad_requests_is_a_few_log_lines(thawd: ThawdProcess) -> None:
    with connect(thawd.socket) as c:
        for i in range(200):
            with pytest.raises(errors.InvalidRequest):
                c._conn.call("Stat", pb.StatRequest(name=f"bad name {i}"))
        with pytest.raises(grpc.RpcError):  # and a raw call the client library would not make
            c._conn._stub.Pin(
                pb.PinRequest(name="x", tier=7),  # type: ignore[arg-type]
                metadata=c._conn.metadata(),
                timeout=5,
            ).next()
    time.sleep(0.2)
    log = thawd.log.read_text()
    refusals = [line for line in log.splitlines() if "refused request" in line]
    assert 1 <= len(refusals) <= 20, len(refusals)  # the throttle's burst per 10 s
    assert "Traceback" not in log
