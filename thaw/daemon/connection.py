"""One connection to thawd: gRPC for control, the fd socket (thaw/daemon/fdsocket.py) for
what gRPC cannot carry: the token bound to this process's credentials, file descriptors, and
the restore opens and closes that every restore waits for. It also holds this process's map
of thawd's whole pool (thaw/daemon/pool_map.py). Thread-safe.

The gRPC channel is made on the first gRPC call, not at connect: a restore from the pinned
tier needs only the fd socket, and importing grpc and waiting for its channel were tens of
milliseconds of a new engine process's connect (the channel alone 24-39 ms on the H200
host). Connect still checks that the gRPC socket accepts.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket as socketlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from thaw import errors
from thaw.daemon import fdsocket
from thaw.daemon.pool_map import PoolMap
from thaw.daemon.refusals import HOW_TO_START, code_name, from_rpc, refused

if TYPE_CHECKING:
    import grpc

SYSTEM_SOCKET = "/run/thawd/thawd.sock"

log = logging.getLogger("thaw.daemon")


def default_socket() -> str:
    """$THAW_SOCKET, else /run/thawd/thawd.sock if present, else $XDG_RUNTIME_DIR/thawd/..."""
    env = os.environ.get("THAW_SOCKET")
    if env:
        return env
    candidates = [SYSTEM_SOCKET]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "thawd", "thawd.sock"))
    for path in candidates:
        if os.path.exists(path):
            return path
    return SYSTEM_SOCKET


class Connection:
    """gRPC and the fd socket to one thawd, and this process's map of its pool."""

    def __init__(self, socket: str, *, timeout: float = 30.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._lock = threading.Lock()  # the fd socket (one request/reply at a time), the pool map
        self._fd_sock: Any = None
        self._token = ""
        self._pid = os.getpid()
        self._pool: dict[str, int] | None = None  # the VMM pool thawd lets clients map whole
        self.opens_json = False  # thawd opens restores on the fd socket ("auth" says so)
        self._pool_map: PoolMap | None = None
        self._grpc_lock = threading.Lock()
        self._channel: Any = None  # made by the first gRPC call (_grpc)
        self._stub: Any = None
        t0 = time.perf_counter()
        self.authenticate()
        try:
            probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                probe.settimeout(timeout)
                probe.connect(socket)
            finally:
                probe.close()
        except OSError as e:
            self.close_transport()
            raise errors.DaemonUnavailable(
                f"thawd at {socket} accepted the fd socket but not gRPC ({e.strerror or e}): "
                "was its socket file removed? restart thawd"
            ) from None
        log.debug("connected: authenticated in %.1f ms", (time.perf_counter() - t0) * 1e3)

    def _grpc(self) -> Any:
        """The gRPC stub, its channel made on first use."""
        with self._grpc_lock:
            if self._stub is None:
                import grpc

                from thaw._proto import thawd_pb2_grpc as pb_grpc

                self._channel = grpc.insecure_channel(
                    f"unix:{self.socket}", options=[("grpc.max_receive_message_length", 64 << 20)]
                )
                self._stub = pb_grpc.ThawdStub(self._channel)
            return self._stub

    def authenticate(self) -> None:
        path = fdsocket.fd_socket_path(self.socket)
        with self._lock:
            self.drop_fd_sock()
            try:
                sock = fdsocket.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise errors.DaemonUnavailable(
                    f"no thawd is running at {self.socket} ({e.strerror}): {HOW_TO_START}"
                ) from None
            except PermissionError:
                raise errors.PermissionDenied(
                    f"uid {os.getuid()} may not connect to {path}: join the thawd socket group "
                    "(socket_group in the thawd config) or ask for allow_uids"
                ) from None
            # A thawd that is stopped or stuck accepts connections but never answers: a call
            # on the fd socket waits `timeout` seconds at most, never forever.
            sock.settimeout(self.timeout)
            try:
                reply, fds = self.exchange(sock, {"op": "auth"}, " on its fd socket")
            except errors.DaemonUnavailable:
                sock.close()
                raise
            except (ConnectionError, OSError) as e:
                sock.close()
                raise errors.DaemonUnavailable(
                    f"thawd at {self.socket} closed the fd socket: {e}"
                ) from None
            for fd in fds:
                os.close(fd)
            if not reply.get("ok"):
                sock.close()
                raise refused(reply)
            self._fd_sock, self._token = sock, reply["token"]
            self._pool = reply.get("pool")
            # A thawd older than the fd socket's JSON "open" does not say so: restores open
            # over gRPC there (thaw/daemon/opened.py).
            self.opens_json = reply.get("open") == "json"
            old = self._pool_map
            if old is None or (self._pool is not None and self._pool["id"] == old.pool_id):
                return
            self._pool_map = None
        # thawd restarted: its old pool goes and its new one comes. The old map goes once the
        # restores holding it end, on its own thread: this thread may be one of them (its
        # open found the restart), and waiting here would wait for itself.
        old.close(wait=False)
        self.map_pool(old.device)

    def map_pool(self, device: int) -> bool:
        """Map thawd's whole pinned pool for CUDA device `device` (imported now, mapped in the
        background), so that no restore to that GPU maps memory or takes fds (docs/DAEMON.md).
        `connect()` does this in a process that uses CUDA. False where thawd shares no pool."""
        with self._lock:
            return self._map_pool(device)

    def _map_pool(self, device: int) -> bool:
        if self._pool is None:
            return False
        if self._pool_map is None:
            try:
                self._pool_map = PoolMap(fdsocket.fd_socket_path(self.socket), self._pool, device)
            except (OSError, errors.ThawError) as e:
                log.info("not mapping thawd's pool (%s): restores map their own buffers", e)
                return False
        return True

    def hold_pool(self) -> Any:
        """Our map of thawd's whole pool (vmm.PoolMirror), held for one restore or freeze:
        its background mapping pauses meanwhile (mapping beside a copy slows the copy). None
        when this process maps no pool."""
        pool_map = self._pool_map
        mirror = pool_map.get(pool_map.device) if pool_map is not None else None
        if mirror is None:
            return None
        try:
            mirror.acquire()
        except errors.CudaError:  # released: thawd went away
            return None
        return mirror

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((fdsocket.TOKEN_METADATA_KEY, self._token), ("x-request-id", uuid.uuid4().hex[:16]))

    def call(self, method: str, request: Any, timeout: float | str | None = "default") -> Any:
        """A unary call; re-authenticates once if the daemon restarted and forgot our token.

        `timeout`: seconds, None for no deadline (long work: verify, a waited-for freeze)."""
        import grpc  # loaded by _grpc(): a lookup

        deadline = self.timeout if timeout == "default" else timeout
        stub = self._grpc()
        for attempt in (0, 1):
            try:
                return getattr(stub, method)(request, metadata=self.metadata(), timeout=deadline)
            except grpc.RpcError as e:
                if attempt == 0 and code_name(e) == "UNAUTHENTICATED":
                    self.authenticate()
                    continue
                raise from_rpc(e, self.socket) from None
        raise AssertionError("unreachable")

    def stream(self, method: str, request: Any, timeout: float | None) -> Iterator[Any]:
        import grpc  # loaded by _grpc(): a lookup

        stub = self._grpc()
        for attempt in (0, 1):
            call = getattr(stub, method)(request, metadata=self.metadata(), timeout=timeout)
            first = True
            try:
                for item in call:
                    first = False
                    yield item
                return
            except grpc.RpcError as e:
                if first and attempt == 0 and code_name(e) == "UNAUTHENTICATED":
                    self.authenticate()
                    continue
                raise from_rpc(e, self.socket) from None
            finally:
                call.cancel()

    def redeem(self, session_id: str) -> tuple[list[int], list[int], int]:
        """The fds of an open session, over the fd socket (checked against our SO_PEERCRED):
        (fds, bytes each maps, the daemon's buffer id). The caller closes the fds.

        One message carries at most fdsocket.MAX_FDS fds: a buffer of more chunks (over
        63 GiB) comes in turns, until thawd says none are left."""
        all_fds: builtins.list[int] = []
        all_sizes: builtins.list[int] = []
        try:
            while True:
                reply, fds = self.fd_call(
                    {"op": "fd", "session": session_id}, "while handing over memory"
                )
                all_fds += fds
                sizes = [int(n) for n in reply.get("sizes", [])]
                if not reply.get("ok") or not fds or len(fds) != len(sizes):
                    raise refused(reply)
                all_sizes += sizes
                if not reply.get("left"):
                    return all_fds, all_sizes, int(reply.get("buffer", 0))
        except BaseException:
            for fd in all_fds:
                os.close(fd)
            raise

    def fd_request(
        self,
        message: dict[str, Any],
        doing: str,
        reconnect: bool = False,
    ) -> dict[str, Any]:
        """`_fd_call` for a request whose reply carries no fds (any that come are closed)."""
        reply, fds = self.fd_call(message, doing, reconnect)
        for fd in fds:
            os.close(fd)
        return reply

    def fd_call(
        self,
        message: dict[str, Any],
        doing: str = "",
        reconnect: bool = False,
    ) -> tuple[dict[str, Any], builtins.list[int]]:
        """One request and its reply on the fd socket: (reply, the fds attached, which the
        caller closes). DaemonUnavailable when thawd is gone (`doing` says when).
        `reconnect`: connect anew when the connection is gone or broke (thawd restarted) and
        send the request again, once; only for requests that change nothing when lost."""
        when = f" {doing}" if doing else ""
        for attempt in (0, 1):
            if reconnect and self._fd_sock is None:
                self.authenticate()
            with self._lock:
                sock = self._fd_sock
                if sock is None:
                    raise errors.DaemonUnavailable("not connected to thawd")
                try:
                    return self.exchange(sock, message, when)
                except errors.DaemonUnavailable:
                    self.drop_fd_sock()
                    raise
                except (ConnectionError, OSError) as e:
                    # A reply may still come on this connection: never read it as another's.
                    self.drop_fd_sock()
                    if not reconnect or attempt:
                        raise errors.DaemonUnavailable(
                            f"thawd at {self.socket} went away{when} ({e})"
                        ) from None
        raise AssertionError("unreachable")

    def exchange(
        self,
        sock: Any,
        message: dict[str, Any],
        when: str,
    ) -> tuple[dict[str, Any], builtins.list[int]]:
        """Send `message` on an fd-socket connection and receive the reply: DaemonUnavailable
        when thawd does not answer within the timeout (`when`: " while ...", or "");
        a broken connection raises as it is."""
        try:
            fdsocket.send(sock, message)
            return fdsocket.recv(sock)
        except TimeoutError:
            raise errors.DaemonUnavailable(
                f"thawd at {self.socket} did not answer{when} in {self.timeout} s "
                "(stopped or stuck?): check `systemctl status thawd`"
            ) from None

    def drop_fd_sock(self) -> None:
        """Close the fd socket (thawd revokes its token with it: the next gRPC call is refused
        and re-authenticates). Called with the lock held."""
        if self._fd_sock is not None:
            self._fd_sock.close()
            self._fd_sock = None

    def in_flight(
        self,
        method: str,
        requests: builtins.list[Any],
    ) -> tuple[builtins.list[Any], builtins.list[grpc.RpcError]]:
        """Send every request at once; (the replies that came, the failures), once all ended."""
        import grpc  # loaded by _grpc(): a lookup

        call = getattr(self._grpc(), method)
        futures = [call.future(r, metadata=self.metadata(), timeout=self.timeout) for r in requests]
        replies, failures = [], []
        for future in futures:
            try:
                replies.append(future.result())
            except grpc.RpcError as e:
                failures.append(e)
        return replies, failures

    def daemon_copy(
        self, method: str, session_id: str, batches: Iterator[tuple[Any, Callable[[], int]]]
    ) -> int:
        """Have thawd copy between its pool and our exported GPU allocations (`CopyInto` for a
        restore, `CopyOut` for a freeze), one call per batch: each batch is sent before the
        next is exported, so exporting overlaps the daemon's copies. Returns bytes moved."""
        import grpc  # loaded by _grpc(): a lookup

        from thaw._proto import thawd_pb2 as pb  # so is protobuf

        stub = self._grpc()
        calls, finishes = [], []
        try:
            for exported, finish in batches:
                calls.append(
                    getattr(stub, method).future(
                        pb.DaemonCopyRequest(
                            session_id=session_id,
                            device_uuid=exported.device_uuid,
                            regions=[
                                pb.GpuRegion(ipc_handle=h, size=n) for h, n in exported.regions
                            ],
                            copies=[
                                pb.GpuCopy(tensor=t, region=r, offset=o)
                                for t, r, o in exported.copies
                            ],
                        ),
                        metadata=self.metadata(),
                    )
                )
                finishes.append(finish)
            for call in calls:
                call.result()
        except grpc.RpcError as e:
            raise from_rpc(e, self.socket) from None
        finally:
            for call in calls:  # after a failure, the batches still in flight
                call.cancel()
        return sum(finish() for finish in finishes)

    def close_pool_map(self) -> None:
        """Release this process's map of the pool (once the copies holding it are done)."""
        with self._lock:
            pool_map, self._pool_map = self._pool_map, None
        if pool_map is not None:
            pool_map.close()

    def close_transport(self) -> None:
        with self._lock:
            self.drop_fd_sock()
        with self._grpc_lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()
