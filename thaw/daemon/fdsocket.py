"""The fd socket: small JSON messages with file descriptors attached (SCM_RIGHTS).

thawd listens on a second Unix socket beside its gRPC socket (`thawd.sock` -> `thawd.fd.sock`,
same directory, same mode). It is SOCK_SEQPACKET, so one message is one packet and the fds
travel with the message that names them. Every request is bound to the kernel's SO_PEERCRED
of the connection (which gRPC's Python API cannot expose; docs/DAEMON.md):

    {"op": "auth"}                     -> {"ok": true, "token": T, "uid": U, ...}
    {"op": "fd", "session": S}         -> {"ok": true, "sizes": [N...], ...} + one fd per size
    {"op": "open", "restores": [R...]} -> {"ok": true, "opened": [O...]}: restore sessions opened
                                          as OpenRestore would; R and O are OpenRestoreRequest
                                          and OpenRestoreResponse as JSON (opened.py), at most
                                          MAX_OPENS, or {"ok": false, "error": TOO_LARGE}: open
                                          over gRPC (the replies would not fit one packet, or
                                          R is serialized protobuf, as clients before the JSON
                                          open sent); "auth" says "open": "json"
    {"op": "close", "sessions": [{"id": S, "ok": B, "bytes": N, "seconds": F, "error": E}...]}
                                       -> {"ok": true}: restore sessions ended, each confirmed
                                          (ok) or failed (error), as CloseRestore would
    {"op": "pool", "start": I, "count": C}
                                       -> {"ok": true, "pool": P, "start": I, "sizes": [N...]}
                                          + the fds of the VMM pool's chunks I, I+1, ... (at
                                          most C, MAX_FDS without it; "auth" says how many
                                          chunks there are)
    failure                            -> {"ok": false, "error": "PermissionDenied", "message": M}

The token goes into the metadata of every gRPC call and is valid while the connection that
issued it stays open. Where clients may map the whole VMM pool (share_pool), the "auth" reply
also carries `"pool": {"id": P, "chunk": BYTES, "chunks": N}`. Both sides import this
module; it has no other dependency.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

MAX_MESSAGE = 64 << 10
MAX_FDS = 253  # SCM_MAX_FD: a VMM pool buffer is one fd per chunk
MAX_CLOSES = 32  # sessions per "close" message: each error text is at most ~1 KB
MAX_OPENS = 64  # restores per "open" message
TOO_LARGE = "TooLarge"  # an "open" refused: open over gRPC (see the docstring)
TOKEN_METADATA_KEY = "thaw-token"


def fd_socket_path(grpc_socket: str | os.PathLike[str]) -> str:
    """The fd socket that belongs to a gRPC socket: `x.sock` -> `x.fd.sock`, same directory."""
    path = os.fspath(grpc_socket)
    stem = path[: -len(".sock")] if path.endswith(".sock") else path
    return stem + ".fd.sock"


def open_reply_size(response_sizes: list[int]) -> int:
    """At most the bytes of an "open" reply carrying responses of these JSON sizes."""
    return 32 + sum(n + 1 for n in response_sizes)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected `sock`, as the kernel recorded it."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"fd socket message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("fd socket message is not an object")
    return message


def send(
    sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
) -> None:
    """Send one message, with `fds` attached (the receiver gets its own duplicates)."""
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and the fds attached to it. Raises ConnectionError at EOF."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the peer closed the fd socket")
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise ConnectionError("fd socket message truncated")
    return decode(data), fds


def free_slots() -> int:
    """How many more fds this process's fd table holds before it must grow.

    Growing it in a process with threads (any CUDA process) waits for an RCU grace period (the
    kernel's expand_fdtable): a new process's first 80 pool fds took 6-27 ms on the H200 hosts
    where they fitted in 0.2-0.4 ms once the table had grown. A client that takes fds in
    batches of this size, and closes each batch before the next, never waits for it."""
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) for line in status if line.startswith("FDSize:"))
        return size - len(os.listdir("/proc/self/fd"))
    except (OSError, StopIteration):  # no /proc here: take them all, the table may grow
        return MAX_FDS


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
