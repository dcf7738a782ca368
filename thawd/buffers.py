"""The daemon's memory: pool buffers (pinned tier) and file mappings (warm tier).

A pool buffer is memfd shared memory (sealed read-only once filled, mlocked where
RLIMIT_MEMLOCK allows) or CUDA VMM host memory exported as a POSIX fd. The backend is chosen
once at start (`choose_pool_kind`): VMM when CUDA can allocate host memory through it, else
memfd. Both hand the client an fd it maps; only the copy primitive differs.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from thaw import _native
from thaw.format import Snapshot
from thaw.pool import Mapping, create_memfd, seal

log = logging.getLogger("thawd.buffers")

# VMM granularity on current GPUs is 2 MiB; memfd pages are 4 KiB. Rounding both to 2 MiB
# keeps the budget arithmetic identical across backends.
GRANULE = 2 << 20


def round_size(n: int) -> int:
    return max(GRANULE, (n + GRANULE - 1) // GRANULE * GRANULE)


def choose_pool_kind(configured: str) -> str:
    if configured == "memfd":
        return "memfd"
    try:
        from thaw import vmm

        if vmm.supported():
            return "vmm"
        reason = "no GPU, or its driver cannot create shareable host memory"
    except Exception as e:  # no CUDA bindings or driver at all
        reason = str(e)
    if configured == "vmm":
        raise RuntimeError(f"pool = 'vmm' but CUDA VMM host memory is unavailable: {reason}")
    log.info("pool: memfd (CUDA VMM host memory unavailable: %s)", reason)
    return "memfd"


class PoolBuffer:
    """`size` bytes of pool memory; `addr` is writable until `finish()`."""

    def __init__(self, kind: str, name: str, size: int, lock: bool) -> None:
        self.kind = kind
        self.size = round_size(size)
        self.locked = False
        self._lock = lock
        self._host: Any = None
        self._rw: Mapping | None = None
        self._ro: Mapping | None = None
        if kind == "vmm":
            from thaw import vmm

            self._host = vmm.HostBuffer.create(self.size)
            self.size = self._host.size
            self.fd = self._host.export_fd()
            self.addr = self._host.addr
            self.locked = True  # VMM host memory is page-locked by construction
        else:
            self.fd = create_memfd(name, self.size)
            try:
                self._rw = Mapping(self.fd, self.size, writable=True)
            except BaseException:
                os.close(self.fd)
                raise
            self.addr = self._rw.addr

    def finish(self) -> None:
        """Make the buffer immutable: after this the daemon and every client only read it.

        memfd: the daemon's writable mapping goes, the write seals go on (EBUSY while a client
        still maps it writable), and a read-only mapping is locked to keep it resident.
        """
        if self.kind != "memfd" or self._ro is not None:
            return
        assert self._rw is not None
        self._rw.close()
        self._rw = None
        seal(self.fd)
        self._ro = Mapping(self.fd, self.size)
        self.addr = self._ro.addr
        self.locked = self._ro.lock() if self._lock else False

    def close(self) -> None:
        for m in (self._rw, self._ro):
            if m is not None:
                m.close()
        self._rw = self._ro = None
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.addr = 0


class WarmMapping:
    """A snapshot's payload mapped read-only, read ahead, and mlocked where allowed."""

    def __init__(self, snapshot: Snapshot, threads: int, lock: bool) -> None:
        self.size = round_size(snapshot.payload_length)
        self.fd = os.open(snapshot.path, os.O_RDONLY | os.O_CLOEXEC)
        self.offset = snapshot.payload_offset
        self.length = snapshot.payload_length
        self.mapping: Mapping | None = None
        self.locked = False
        if self.length:
            try:
                self.mapping = Mapping(self.fd, self.length, self.offset)
                self.mapping.advise(mmap.MADV_WILLNEED)
                _native.prefault(self.mapping.addr, self.length, threads, False)
                self.locked = self.mapping.lock() if lock else False
            except BaseException:
                self.close()
                raise

    def resident_bytes(self) -> int:
        if self.fd < 0 or not self.length:
            return 0
        return int(_native.resident_bytes(self.fd, self.offset, self.length))

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
