"""The fd socket server: authenticates peers by SO_PEERCRED and hands out memory fds.

Protocol in thaw/fdsocket.py. One connection per client: its first message is usually "auth"
(a token for gRPC metadata, valid while this connection lives); "fd" redeems a session
opened over gRPC, only for the uid that opened it; "open" and "close" open and end restore
sessions as the OpenRestore and CloseRestore calls do, at a tenth of a gRPC call's latency
(every restore waits for both); "pool" hands out the whole VMM pool's chunks (share_pool
only). When the connection closes, the token dies and the sessions it opened end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from thaw._proto import thawd_pb2 as pb
from thaw.daemon import fdsocket
from thaw.errors import DaemonUnavailable, InvalidRequest, PermissionDenied, ThawError
from thawd.security import AllowList, Peer, Tokens
from thawd.state import Daemon
from thawd.throttle import Throttle

log = logging.getLogger("thawd.fdserver")
_refusals = Throttle()


class FdServer:
    def __init__(self, path: str, mode: int, gid: int, allow: AllowList, tokens: Tokens) -> None:
        self.path = path
        self.mode = mode
        self.gid = gid
        self.allow = allow
        self.tokens = tokens
        self.daemon: Daemon | None = None
        self.stopping: asyncio.Event | None = None
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # never a moment with a wider mode than 0600
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chown(self.path, -1, self.gid)
        os.chmod(self.path, self.mode)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock

    def start(self, daemon: Daemon, stopping: asyncio.Event) -> None:
        self.daemon, self.stopping = daemon, stopping
        self._accept = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = asyncio.ensure_future(self._handle(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        token = ""
        try:
            pid, uid, gid = fdsocket.peer_credentials(conn)
            peer = Peer.from_credentials(pid, uid, gid)
            while True:
                data = await loop.sock_recv(conn, fdsocket.MAX_MESSAGE)
                if not data:
                    return
                try:
                    message = fdsocket.decode(data)
                    self.allow.check(peer)
                    op = message.get("op")
                    if op == "auth":
                        token = token or self.tokens.issue(peer)
                        reply = {"ok": True, "token": token, "uid": uid, "gid": gid, "pid": pid,
                                 "open": "json"}  # fmt: skip
                        arena = self.daemon.restores.shared_arena() if self.daemon else None
                        if arena is not None and arena.chunks:
                            reply["pool"] = {
                                "id": arena.id,
                                "chunk": arena.chunk,
                                "chunks": len(arena.chunks),
                            }
                        fdsocket.send(conn, reply)
                    elif op == "open":
                        reply = await self._open_restores(peer, token, message.get("restores"))
                        fdsocket.send(conn, reply)
                    elif op == "close":
                        assert self.daemon is not None
                        self._close_sessions(peer, message.get("sessions", []))
                        fdsocket.send(conn, {"ok": True})
                    elif op == "pool":
                        assert self.daemon is not None
                        t0 = time.perf_counter()
                        start = _integer(message, "start", 0, 1 << 31)
                        # "count": the fds the client's fd table holds without growing.
                        count = _integer(message, "count", fdsocket.MAX_FDS, fdsocket.MAX_FDS + 1)
                        fds, sizes, pool_id = self.daemon.restores.pool_fds(start, max(1, count))
                        reply = {"ok": True, "pool": pool_id, "start": start, "sizes": sizes}
                        _hand_over(conn, reply, fds, "pool fds", pid, t0)
                    elif op == "fd":
                        assert self.daemon is not None
                        t0 = time.perf_counter()
                        fds, sizes, kind, buffer_id, left = self.daemon.restores.redeem(
                            _text(message, "session", 64), uid
                        )
                        reply = {"ok": True, "sizes": sizes, "kind": kind, "buffer": buffer_id,
                                 "left": left}  # fmt: skip
                        _hand_over(conn, reply, fds, "fds", pid, t0)
                    else:
                        fdsocket.send(
                            conn,
                            {
                                "ok": False,
                                "error": "InvalidRequest",
                                "message": f"unknown op {op!r}",
                            },
                        )
                except ThawError as e:
                    _refusals.log(
                        log,
                        logging.INFO,
                        "fd socket: pid %d uid %d refused: %s",
                        pid,
                        uid,
                        str(e)[:300],
                    )
                    fdsocket.send(conn, {"ok": False, "error": type(e).__name__, "message": str(e)})
                except (ValueError, TypeError, OverflowError, RecursionError) as e:
                    # A malformed message (fields are checked above; this is the backstop).
                    _refusals.log(
                        log,
                        logging.INFO,
                        "fd socket: pid %d uid %d sent a malformed message: %s",
                        pid,
                        uid,
                        str(e)[:300],
                    )
                    reply = {
                        "ok": False,
                        "error": "InvalidRequest",
                        "message": f"malformed message: {str(e)[:300]}",
                    }
                    fdsocket.send(conn, reply)
        except (ConnectionError, OSError) as e:
            log.debug("fd socket connection ended: %s", e)
        finally:
            if token:
                self.tokens.revoke(token)
                if self.daemon is not None:
                    self.daemon.restores.drop_token(token)
            conn.close()

    async def _open_restores(self, peer: Peer, token: str, restores: Any) -> dict[str, Any]:
        """OpenRestore for each serialized request, the responses in one reply. A batch whose
        manifests would not fit one packet is refused before anything opens (fdsocket.TOO_LARGE):
        the client opens it over gRPC."""
        assert self.daemon is not None and self.stopping is not None
        if not token:
            raise PermissionDenied("open: authenticate this connection first (op auth)")
        if self.stopping.is_set():
            raise DaemonUnavailable("thawd is stopping; retry once it is back")
        if isinstance(restores, list) and restores and all(isinstance(r, str) for r in restores):
            # A client from before the JSON open (serialized protobuf): TooLarge sends it to
            # gRPC's OpenRestore, which it falls back to, and which every version speaks.
            return {
                "ok": False,
                "error": fdsocket.TOO_LARGE,
                "message": "this thawd opens restores on the fd socket in JSON "
                "(thaw/daemon/opened.py): open over gRPC",
            }
        if (
            not isinstance(restores, list)
            or not 0 < len(restores) <= fdsocket.MAX_OPENS
            or not all(isinstance(r, dict) for r in restores)
        ):
            raise InvalidRequest(
                f"open: restores must be a list of 1 to {fdsocket.MAX_OPENS} "
                "OpenRestoreRequests ({name, mapped_buffer, ...}: thaw/daemon/opened.py)"
            )
        requests = [_open_request(r) for r in restores]
        sizes = [self.daemon.restores.open_size(r.name) for r in requests]
        if fdsocket.open_reply_size(sizes) > fdsocket.MAX_MESSAGE:
            return {
                "ok": False,
                "error": fdsocket.TOO_LARGE,
                "message": "the manifests do not fit one packet: open over gRPC",
            }
        opened: list[dict[str, Any]] = []
        try:
            for request in requests:
                opened.append(await self.daemon.restores.open_json(peer, token, request))
        except BaseException:
            why = "not restored: another of the batch failed to open"
            for o in opened:
                self.daemon.restores.close(peer, o["session_id"], False, 0, 0.0, why)
            raise
        return {"ok": True, "opened": opened}

    def _close_sessions(self, peer: Peer, sessions: list[dict[str, Any]]) -> None:
        """End each restore session (as CloseRestore), then raise the first refusal."""
        assert self.daemon is not None
        if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
            raise InvalidRequest("close: sessions must be a list of {id, ok, bytes, ...}")
        if len(sessions) > fdsocket.MAX_CLOSES:
            raise InvalidRequest(f"close: at most {fdsocket.MAX_CLOSES} sessions per message")
        # Every field checked before any session ends: a bad one refuses the whole message.
        closes = [
            (
                _text(s, "id", 64),
                s.get("ok") is True,
                _integer(s, "bytes", 0, 1 << 63),
                _number(s, "seconds", 1e9),
                _text(s, "error", 1 << 16, "")[:1000],
            )
            for s in sessions
        ]
        first: ThawError | None = None
        for session_id, ok, nbytes, seconds, error in closes:
            try:
                self.daemon.restores.close(peer, session_id, ok, nbytes, seconds, error)
            except ThawError as e:
                first = first or e
        if first is not None:
            raise first

    def stop_accepting(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def close(self) -> None:
        self.stop_accepting()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)


def _open_request(r: dict[str, Any]) -> pb.OpenRestoreRequest:
    """One request of an "open" (thaw/daemon/opened.py), every field checked."""
    unknown = set(r) - {"name", "mapped_buffer", "daemon_copy", "can_daemon_copy", "pool_id"}
    if unknown:
        raise InvalidRequest(f"open: unknown field(s) {sorted(unknown)[:4]}")
    flags = {k: r.get(k, False) for k in ("daemon_copy", "can_daemon_copy")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise InvalidRequest("open: daemon_copy and can_daemon_copy must be true or false")
    return pb.OpenRestoreRequest(
        name=_text(r, "name", 128),  # what NAME_RE allows; the registry checks the rest
        mapped_buffer=_integer(r, "mapped_buffer", 0, 1 << 64),
        pool_id=_integer(r, "pool_id", 0, 1 << 64),
        **flags,
    )


def _integer(message: dict[str, Any], key: str, default: int, bound: int) -> int:
    """`message[key]` as an int in [0, bound): JSON numbers such as 1e400 or 1.5 are refused."""
    value = message.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
        raise InvalidRequest(f"{key} must be an integer in [0, {bound}), not {str(value)[:32]}")
    return value


def _number(message: dict[str, Any], key: str, bound: float) -> float:
    value = message.get(key, 0.0)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < bound:
        raise InvalidRequest(f"{key} must be a number in [0, {bound:g}), not {str(value)[:32]}")
    return float(value)


def _text(message: dict[str, Any], key: str, bound: int, default: str | None = None) -> str:
    value = message.get(key, default)
    if not isinstance(value, str) or len(value) > bound:
        raise InvalidRequest(f"{key} must be a string of at most {bound} characters")
    return value


def _hand_over(
    conn: socket.socket, reply: dict[str, Any], fds: list[int], what: str, pid: int, t0: float
) -> None:
    """Send `reply` with `fds` attached (the peer gets its own duplicates), then close ours;
    the debug log says how long since `t0` the request took."""
    try:
        fdsocket.send(conn, reply, fds)
    finally:
        for fd in fds:
            os.close(fd)
    log.debug("fd socket: %d %s to pid %d in %.2f ms", len(fds), what, pid,
              (time.perf_counter() - t0) * 1e3)  # fmt: skip
