"""A client's map of thawd's whole VMM pool, kept for exactly as long as that thawd lives.

Where thawd shares its pool (`share_pool`, the default on GPU hosts), a CUDA process maps all
of it once, at connect, on a thread of its own: its chunks' fds come over a second fd-socket
connection, are imported at once, and are mapped for the process's GPU in the background.
A restore of any pinned snapshot then needs no fds, imports or maps (DELIVERY_POOL).

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

from thaw import errors, fdpass

log = logging.getLogger("thaw.mirror")


class PoolMap:
    """The background work of mapping the pool and watching thawd; `get` hands out the map."""

    def __init__(self, fd_socket: str, pool: dict[str, int], device: int) -> None:
        self.pool_id = int(pool["id"])
        self.device = device
        self._chunk, self._chunks = int(pool["chunk"]), int(pool["chunks"])
        # Connected now (it cannot block): close() can always shut it down.
        self._sock = fdpass.connect(fd_socket)
        self._mirror: Any = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thaw-pool-map", daemon=True)
        self._thread.start()

    def get(self, device: int, timeout: float) -> Any:
        """The pool's mapping (a vmm.PoolMirror) for restores to `device`, once imported;
        None when this process does not map the pool for that GPU (or could not)."""
        if device != self.device or not self._ready.wait(timeout):
            return None
        return self._mirror

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        from thaw import vmm

        t0 = time.perf_counter()
        try:
            mirror = vmm.PoolMirror(self.pool_id, self._chunk, self._chunks, self.device)
        except errors.CudaError as e:
            log.info("not mapping thawd's pool (%s): restores map their own buffers", e)
            self._ready.set()
            return
        try:
            self._import(mirror)
        except (OSError, ConnectionError, errors.ThawError) as e:
            log.info("not mapping thawd's pool (%s): restores map their own buffers", e)
            mirror.close()
            self._ready.set()
            return
        t_import = time.perf_counter()
        self._mirror = mirror
        self._ready.set()
        try:
            for i in range(self._chunks):
                if self._stop.is_set() or not mirror.wait_idle():
                    break
                mirror.map_range(i * self._chunk, (i + 1) * self._chunk)
            log.debug("pool %d: %d chunks imported in %.1f ms, mapped in %.1f ms", self.pool_id,
                      self._chunks, (t_import - t0) * 1e3,
                      (time.perf_counter() - t_import) * 1e3)  # fmt: skip
            # Idle until thawd closes the connection (it stopped) or close() shuts it down.
            while self._sock.recv(1):
                pass
        except (OSError, errors.CudaError) as e:
            log.debug("pool %d: %s", self.pool_id, e)
        finally:
            self._mirror = None
            mirror.close()
            log.debug("pool %d: mapping released", self.pool_id)

    def _import(self, mirror: Any) -> None:
        start = 0
        while start < self._chunks:
            fdpass.send(self._sock, {"op": "pool", "start": start})
            reply, fds = fdpass.recv(self._sock)
            try:
                if not reply.get("ok") or not fds:
                    raise errors.DaemonError(reply.get("message", "no pool fds"))
                if int(reply.get("pool", 0)) != self.pool_id:
                    raise errors.DaemonError("thawd restarted while its pool was being mapped")
                mirror.add(start, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            start += len(fds)

    def close(self) -> None:
        """Stop mapping, release the map (after the copies using it) and end the thread."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the idle recv returns: the map goes
        self._thread.join()
        self._sock.close()
