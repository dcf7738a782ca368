"""Peers are checked: uids outside the allow-list are refused, tokens are required, and a
caller may only register files it could read itself. Needs root (to run clients as others)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import grpc
import pytest

from tests.daemon.conftest import ThawdProcess, random_tensors, run_client, write_snapshot
from thaw._proto import thawd_pb2 as pb
from thaw._proto import thawd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run clients as other uids")

ALLOWED, STRANGER = 65534, 65533


@pytest.fixture(scope="module")
def open_thawd() -> Iterator[ThawdProcess]:
    # Mode 0666 so the allow-list, not the socket's mode, is what stops the stranger.
    from tests.daemon.conftest import make_dir

    daemon = ThawdProcess(make_dir(), socket_mode="0666", allow_uids=[ALLOWED]).start()
    yield daemon
    daemon.close()


def test_uid_outside_allow_list_is_refused(open_thawd: ThawdProcess) -> None:
    code = f"""
try:
    thaw.client.connect({open_thawd.socket!r}).list()
    print("ALLOWED")
except thaw.errors.PermissionDenied as e:
    print("DENIED", e)
"""
    out = run_client(code, uid=STRANGER)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DENIED") and f"uid {STRANGER}" in out.stdout
    out = run_client(code, uid=ALLOWED)
    assert out.stdout.startswith("ALLOWED"), out.stdout + out.stderr


def test_calls_without_a_token_are_refused(open_thawd: ThawdProcess) -> None:
    with grpc.insecure_channel(f"unix:{open_thawd.socket}") as channel:
        stub = pb_grpc.ThawdStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.List(pb.ListRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.List(pb.ListRequest(), metadata=(("thaw-token", "forged"),), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_register_requires_the_caller_to_read_the_file(open_thawd: ThawdProcess) -> None:
    private = open_thawd.dir / "private"
    private.mkdir(mode=0o700)
    hidden = write_snapshot(private / "hidden.thaw", random_tensors(8))
    public = write_snapshot(open_thawd.dir / "public.thaw", random_tensors(9))
    os.chmod(public, 0o644)
    unreadable = write_snapshot(open_thawd.dir / "mine.thaw", random_tensors(9))
    os.chmod(unreadable, 0o600)
    code = f"""
c = thaw.client.connect({open_thawd.socket!r})
out = {{}}
for name, path in (("hidden", {str(hidden)!r}), ("mine", {str(unreadable)!r}),
                   ("public", {str(public)!r})):
    try:
        out[name] = c.register(path, name).name
    except thaw.errors.DaemonError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""
    out = run_client(code, uid=ALLOWED)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"hidden": "PermissionDenied", "mine": "PermissionDenied", "public": "public"}


def test_sessions_are_redeemed_only_by_their_uid(open_thawd: ThawdProcess) -> None:
    from thaw.client import connect
    from thaw.daemon import fdsocket
    from thaw.errors import NotFound

    path = write_snapshot(open_thawd.dir / "s.thaw", random_tensors(11))
    c = connect(open_thawd.socket)  # stays open: its sessions end with its fd-socket connection
    c.register(path, "s")
    info = c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="s"))
    code = f"""
from thaw.daemon import fdsocket
s = fdsocket.connect({fdsocket.fd_socket_path(open_thawd.socket)!r})
fdsocket.send(s, {{"op": "fd", "session": {info.session_id!r}}})
reply, fds = fdsocket.recv(s)
fdsocket.send(s, {{"op": "close", "sessions": [{{"id": {info.session_id!r}, "ok": True}}]}})
closed, _ = fdsocket.recv(s)
print(json.dumps([reply.get("error"), len(fds), closed.get("error")]))
"""
    out = run_client(code, uid=ALLOWED)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "PermissionDenied",
        0,
        "PermissionDenied",
    ], out.stderr
    fds, sizes, _ = c._conn.redeem(info.session_id)  # its owner still gets it, once
    assert len(fds) == len(sizes) == 1 and sizes[0] > 0
    import os as _os

    _os.close(fds[0])
    with pytest.raises(NotFound):
        c._conn.redeem(info.session_id)
    c.close()
