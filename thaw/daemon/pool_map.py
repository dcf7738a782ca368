"""A client's map of thawd's whole VMM pool, kept for exactly as long as that thawd lives.

Where thawd shares its pool (`share_pool`, the default on GPU hosts), a CUDA process maps all
of it once: its chunks' fds come over a second fd-socket connection at connect, in batches
that fit the free slots of the process's fd table, each chunk imported and its fd closed
before the next batch (the table never grows: fdsocket.free_slots); a thread of its own then
maps them for the process's GPU while the engine goes on building its model, and a restore
that starts first maps the chunks it reaches itself, between its copies. A restore of any
pinned snapshot then needs no fds, imports or maps of its own (DELIVERY_POOL).

That connection stays open and idle: when it reaches EOF, thawd has gone away, and the map is
released (once the copies using it finish), so a stopped or restarted thawd's page-locked
memory is not held by its former clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from thaw import errors
from thaw.daemon import fdsocket

log = logging.getLogger("thaw.daemon.pool_map")
# Fd slots left free for other threads (gRPC's, the engine's) opening fds meanwhile.
FD_MARGIN = 4


class PoolMap:
    """The pool's chunks (imported at construction), their mapping in the background, and
    the watch on thawd.

    Raises OSError, ConnectionError or ThawError when the pool cannot be imported here (the
    caller restores without it)."""

    def __init__(self, fd_socket: str, pool: dict[str, int], device: int) -> None:
        from thaw.mem import vmm

        self.pool_id = int(pool["id"])
        self.device = device
        self._chunk, self._chunks = int(pool["chunk"]), int(pool["chunks"])
        self._stop = threading.Event()
        t0 = time.perf_counter()
        self._sock = fdsocket.connect(fd_socket)
        try:
            self._sock.settimeout(30.0)  # a stuck thawd: give up, restore without the map
            mirror = vmm.PoolMirror(self.pool_id, self._chunk, self._chunks, device)
            try:
                self._import_chunks(mirror)
            except BaseException:
                mirror.close()
                raise
            self._sock.settimeout(None)  # from now on it only waits for thawd's EOF
        except BaseException:
            self._sock.close()
            raise
        self._mirror: Any = mirror
        log.debug(
            "pool %d: %d chunks imported in %.1f ms",
            self.pool_id,
            self._chunks,
            (time.perf_counter() - t0) * 1e3,
        )
        self._thread = threading.Thread(target=self._run, name="thaw-pool-map", daemon=True)
        self._thread.start()

    def get(self, device: int) -> Any:
        """The pool's mapping (a vmm.PoolMirror) for restores to `device`; None when this
        process does not map the pool for that GPU, or no longer (thawd went away)."""
        return self._mirror if device == self.device else None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _import_chunks(self, mirror: Any) -> None:
        """Every chunk's fd from thawd, imported and closed, a batch at a time."""
        start = 0
        while start < self._chunks:
            count = max(1, min(fdsocket.MAX_FDS, fdsocket.free_slots() - FD_MARGIN))
            fdsocket.send(self._sock, {"op": "pool", "start": start, "count": count})
            reply, fds = fdsocket.recv(self._sock)
            if not reply.get("ok") or not fds or int(reply.get("pool", 0)) != self.pool_id:
                for fd in fds:
                    os.close(fd)
                if reply.get("ok") and fds:
                    raise errors.DaemonError("thawd restarted while its pool was being mapped")
                raise errors.DaemonError(reply.get("message", "no pool fds"))
            taken = fds[: self._chunks - start]
            mirror.offer(start, taken)
            for fd in fds[self._chunks - start :]:  # more than the pool has: never ours to keep
                os.close(fd)
            for i in range(start, start + len(taken)):
                mirror.import_chunk(i)  # closes its fd
            start += len(taken)

    def _run(self) -> None:
        mirror = self._mirror
        t0 = time.perf_counter()
        try:
            for i in range(self._chunks):
                if self._stop.is_set() or not mirror.wait_idle():
                    break
                mirror.map_range(i * self._chunk, (i + 1) * self._chunk)
            log.debug("pool %d: mapped in %.1f ms", self.pool_id, (time.perf_counter() - t0) * 1e3)
            # Idle until thawd closes the connection (it stopped) or close() shuts it down.
            while self._sock.recv(1):
                pass
        except (OSError, errors.CudaError) as e:
            log.debug("pool %d: %s", self.pool_id, e)
        finally:
            self._mirror = None
            mirror.close()
            self._sock.close()
            log.debug("pool %d: mapping released", self.pool_id)

    def close(self, wait: bool = True) -> None:
        """Stop mapping and release the map once the copies using it are done; `wait` for
        that. Without waiting, the map's own thread releases it: the caller may hold the map
        itself (a restore that finds thawd restarted and re-authenticates)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the idle recv returns: the map goes
        if wait:
            self._thread.join()
