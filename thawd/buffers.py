"""The daemon's memory: pool buffers (pinned tier) and file mappings (warm tier).

A pool buffer is memfd shared memory (sealed read-only once filled, mlocked where
RLIMIT_MEMLOCK allows) or CUDA VMM host memory exported as a POSIX fd. The backend is chosen
once at start (`choose_pool_kind`): VMM when CUDA can allocate host memory through it, else
memfd. Both hand the client an fd it maps; only the copy primitive differs.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import logging
import mmap
import os
import secrets
from typing import Any

from thaw import _native
from thaw.errors import CudaError
from thaw.format.residency import resident_estimate
from thaw.mem.mapping import Mapping
from thawd.files import SnapshotFile

log = logging.getLogger("thawd.buffers")

# VMM granularity on current GPUs is 2 MiB; memfd pages are 4 KiB. Rounding both to 2 MiB
# keeps the budget arithmetic identical across backends.
GRANULE = 2 << 20


# Page-cache warming reads ranges of at least this much per madvise call.
PIN_STEP = 64 << 20

# Write seals make a memfd buffer immutable for every holder of the fd: clients get it
# read-only by construction, not by trusting them to map it PROT_READ.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def create_memfd(name: str, size: int) -> int:
    """A sealable memfd of `size` bytes (a hole until written)."""
    fd = os.memfd_create(f"thaw:{name}"[:249], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int) -> None:
    """Make a memfd immutable. Fails with EBUSY while any writable mapping of it exists."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


class Chunk:
    """One page-locked host allocation of the VMM pool (thaw.mem.vmm.allocate), exportable as
    a POSIX fd.

    thawd creates its VMM pool as chunks at start: cuMemCreate pins as it allocates (0.91 s
    for 4 GiB on H200), far too slow to do while an engine waits to freeze into the pool.
    """

    def __init__(self, size: int, device: int = 0) -> None:
        from thaw.mem import vmm

        self.handle: Any
        self.handle, self.size = vmm.allocate(size, device)
        self.device = device
        self._fd = -1

    def export_fd(self) -> int:
        """A new fd for this memory, to send over a Unix socket (SCM_RIGHTS). Caller closes it.

        Exported once and duplicated after: a 16 GB buffer is 60 chunks, and every restore
        hands out all of them."""
        from thaw.mem import vmm

        if self._fd < 0:
            self._fd = vmm.export(self.handle)
        return os.dup(self._fd)

    def release(self) -> None:
        from thaw.mem import vmm

        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.handle is not None:
            vmm.release(self.handle)
            self.handle = None


def map_chunks(chunks: list[Chunk], device: int, peers: tuple[int, ...]) -> Any:
    """The pool's own chunks mapped at one address (a thaw.mem.vmm.HostBuffer that leaves
    them owned by the pool), for `device` and `peers`."""
    from thaw.mem import vmm

    return vmm.HostBuffer.of_handles(
        [c.handle for c in chunks], [c.size for c in chunks], device, peers
    )


def round_size(n: int) -> int:
    return max(GRANULE, (n + GRANULE - 1) // GRANULE * GRANULE)


def choose_pool_kind(configured: str) -> str:
    if configured == "memfd":
        return "memfd"
    try:
        from thaw.mem import vmm

        if vmm.supported():
            return "vmm"
        reason = "no GPU, or its driver cannot create shareable host memory"
    except CudaError as e:  # a driver that fails
        reason = str(e)
    if configured == "vmm":
        raise RuntimeError(f"pool = 'vmm' but CUDA VMM host memory is unavailable: {reason}")
    log.info("pool: memfd (CUDA VMM host memory unavailable: %s)", reason)
    return "memfd"


class VmmArena:
    """The pinned tier's memory on a GPU host: equal chunks of VMM host memory made at start.

    cuMemCreate pins as it allocates (0.91 s per 4 GiB on H200) and mapping costs ~27 ms per
    GB, far too slow to do while an engine waits to freeze into the pool, so the whole pinned
    budget is created and mapped once, up front, and a buffer is a run of whole chunks: its
    daemon-side address is a slice of that one mapping. Chunks and not one allocation: a
    client maps only its buffer, and cuMemMap cannot start inside an allocation.
    """

    def __init__(self, budget: int, chunk: int, device: int = 0) -> None:
        from thaw.mem import cuda

        self.chunk = round_size(chunk)
        self.device = device
        # Every GPU may DMA from the daemon's mapping: CUDA IPC copies go to any of them.
        self.peers = tuple(range(cuda.device_count()))
        self.chunks: list[Any] = []
        self.view: Any = None
        try:
            for _ in range(budget // self.chunk):
                self.chunks.append(Chunk(self.chunk, device))
                os.close(self.chunks[-1].export_fd())  # exported now, not in a client's wait
            if self.chunks:
                self.view = map_chunks(self.chunks, device, self.peers)
                # The first CPU write to each page of a new mapping of VMM host memory is slow:
                # a pin into never-written chunks read the page cache at 17.4 GB/s, into
                # written ones at 25.2 (8 GB, H200 host; 0.68 against 0.44 CPU-s per GB).
                # Writing one byte per page now (read, then written back: the memory is
                # unchanged) costs 36 ms per GB at start instead of every first pin.
                _native.prefault(self.view.addr, self.view.size, min(16, os.cpu_count() or 1))
        except BaseException:
            self.close()
            raise
        self.free = [True] * len(self.chunks)
        self.total = len(self.chunks) * self.chunk
        # Names this arena to clients that map it whole (`export_all`); random, so a client
        # never mistakes a restarted daemon's arena for the one it maps.
        self.id = secrets.randbits(62) + 1

    def export_all(self, start: int, count: int) -> tuple[list[int], list[int]]:
        """New fds for chunks start..start+count (fewer at the end), and their sizes: a client
        maps the whole pool once and then restores any contiguous buffer with no fds at all."""
        chunks = self.chunks[start : start + count]
        return [c.export_fd() for c in chunks], [c.size for c in chunks]

    def size_for(self, n: int) -> int:
        """The bytes of budget a buffer of `n` bytes takes: whole chunks."""
        return max(1, -(-n // self.chunk)) * self.chunk

    def take(self, n: int) -> list[int]:
        """Indices of free chunks for `n` bytes: a consecutive run when there is one."""
        count = self.size_for(n) // self.chunk
        run = 0
        for i, free in enumerate(self.free):
            run = run + 1 if free else 0
            if run == count:
                taken = list(range(i - count + 1, i + 1))
                break
        else:
            taken = [i for i, free in enumerate(self.free) if free][:count]
            if len(taken) < count:
                raise MemoryError(f"VMM pool has {len(taken)} free chunks, {count} needed")
        for i in taken:
            self.free[i] = False
        return taken

    def give(self, taken: list[int]) -> None:
        for i in taken:
            self.free[i] = True

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        for chunk in self.chunks:
            chunk.release()
        self.chunks = []


class PoolBuffer:
    """`size` bytes of pool memory; `addr` is writable until `finish()`."""

    def __init__(
        self, kind: str, name: str, size: int, lock: bool, arena: VmmArena | None = None
    ) -> None:
        self.kind = kind
        # Random, so ids never repeat across daemon restarts: clients key their cached
        # mappings by it and must never take a new buffer for an old one.
        self.id = secrets.randbits(62) + 1
        self.locked = False
        self._lock = lock
        self._arena = arena
        self._chunks: list[Any] = []
        self._host: Any = None
        self._rw: Mapping | None = None
        self._ro: Mapping | None = None
        self.fd = -1
        self.pool_offset: int | None = None  # where a contiguous VMM buffer starts in the arena
        if kind == "vmm":
            assert arena is not None
            self._chunks = arena.take(size)
            self.size = len(self._chunks) * arena.chunk
            first = self._chunks[0]
            if self._chunks == list(range(first, first + len(self._chunks))):
                self.pool_offset = first * arena.chunk
                self.addr = arena.view.addr + self.pool_offset
            else:  # a fragmented pool: map this buffer's chunks on their own
                try:
                    chunks = [arena.chunks[i] for i in self._chunks]
                    self._host = map_chunks(chunks, arena.device, arena.peers)
                except BaseException:
                    arena.give(self._chunks)
                    raise
                self.addr = self._host.addr
            self.locked = True  # VMM host memory is page-locked by construction
        else:
            self.size = round_size(size)
            self.fd = create_memfd(name, self.size)
            try:
                self._rw = Mapping(self.fd, self.size, writable=True)
            except BaseException:
                os.close(self.fd)
                raise
            self.addr = self._rw.addr

    def export(self) -> tuple[list[int], list[int]]:
        """New fds for a client, and the bytes each maps, in address order. Caller closes them."""
        if self.kind == "vmm":
            assert self._arena is not None
            chunks = [self._arena.chunks[i] for i in self._chunks]
            return [c.export_fd() for c in chunks], [c.size for c in chunks]
        return [os.dup(self.fd)], [self.size]

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
        if self._arena is not None and self._chunks:
            self._arena.give(self._chunks)
            self._chunks = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.addr = 0


class WarmMapping:
    """A snapshot's payload kept in the page cache: its registered fd mapped read-only, the
    pages read in and mlocked where allowed.

    thawd never touches these pages from user space: a file truncated under a mapping turns
    a load from it into SIGBUS, which would end the daemon for every client. The pages come
    in through the kernel instead (MADV_POPULATE_READ and mlock), which reports the missing
    pages as an error. Clients read the file with pread, never from a mapping of it.
    """

    def __init__(self, file: SnapshotFile, threads: int, lock: bool) -> None:
        snapshot = file.snapshot
        self.size = round_size(snapshot.payload_length)
        self.fd = file.dup()
        self.offset = snapshot.payload_offset
        self.length = snapshot.payload_length
        self.mapping: Mapping | None = None
        self.locked = False
        if self.length:
            try:
                self.mapping = Mapping(self.fd, self.length, self.offset)
                self.mapping.advise(mmap.MADV_WILLNEED)
                self._populate(threads)
                self.locked = self.mapping.lock() if lock else False
            except BaseException:
                self.close()
                raise

    def _populate(self, threads: int) -> None:
        """Read the payload into the page cache on `threads` threads (NVMe wants several
        requests in flight; one madvise reads ahead one range at a time)."""
        assert self.mapping is not None
        step = max(PIN_STEP, -(-self.length // threads) // PIN_STEP * PIN_STEP)
        ranges = [(o, min(step, self.length - o)) for o in range(0, self.length, step)]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(ranges)))) as pool:
            for done in [pool.submit(self.mapping.populate, o, n) for o, n in ranges]:
                done.result()

    def resident_bytes(self) -> int:
        if self.fd < 0 or not self.length:
            return 0
        return resident_estimate(self.fd, self.offset, self.length)

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
