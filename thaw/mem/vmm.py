"""CUDA VMM host memory: the pinned tier that thawd shares with clients as a file descriptor.

thawd creates page-locked host memory with cuMemCreate (CU_MEM_LOCATION_TYPE_HOST_NUMA) and a
POSIX-fd handle; a client imports the fd, maps it and copies from it with its own streams at
the link's full speed, paying no pinning cost (DESIGN.md: 55.35 GB/s on H200 from an imported
mapping, against ~6 s for a per-process cudaHostRegister of 16 GB).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from ctypes import byref, c_size_t, c_uint64

from thaw.errors import CudaError
from thaw.mem import cuda, driver
from thaw.mem.driver import call

log = logging.getLogger("thaw.mem.vmm")
POSIX_FD = driver.MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
GIB = 1 << 30


def _prop(device: int) -> driver.MemAllocationProp:
    prop = driver.MemAllocationProp()
    prop.type = driver.MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.MEM_LOCATION_TYPE_HOST_NUMA
    numa = cuda.device_attribute(device, driver.DEVICE_ATTRIBUTE_HOST_NUMA_ID)
    prop.location.id = max(0, numa)  # -1: the host has no NUMA
    prop.requestedHandleTypes = POSIX_FD
    return prop


def reserve(size: int) -> int:
    """`size` bytes of the process's virtual address space, nothing mapped yet."""
    addr = c_uint64()
    call("cuMemAddressReserve", byref(addr), size, 0, 0, 0, what=f"cuMemAddressReserve({size})")
    return addr.value


def warm_up() -> None:
    """Make the first driver calls now: the driver functions a restore calls are resolved on
    first use, which a first restore should not pay."""
    for name in ("cuMemImportFromShareableHandle", "cuMemMap", "cuMemSetAccess"):
        driver.address(name)
    call("cuMemAddressFree", reserve(GIB), GIB)


def granularity(device: int = 0) -> int:
    cuda.set_device(device)
    size = c_size_t()
    call("cuMemGetAllocationGranularity", byref(size), byref(_prop(device)),
         driver.MEM_ALLOC_GRANULARITY_MINIMUM)  # fmt: skip
    return size.value


@functools.cache
def supported(device: int = 0) -> bool:
    """Whether this host can create shareable VMM host memory (GPU, driver, NUMA support)."""
    if cuda.device_count() <= device:
        return False
    try:
        buf = HostBuffer.create(granularity(device), device)
    except CudaError:
        return False
    buf.close()
    return True


def allocate(size: int, device: int = 0) -> tuple[int, int]:
    """New page-locked host memory (cuMemCreate, HOST_NUMA, exportable as a POSIX fd) of at
    least `size` bytes: (its handle, its size rounded up to the VMM granularity)."""
    cuda.set_device(device)
    gran = granularity(device)
    size = (size + gran - 1) // gran * gran
    handle = c_uint64()
    call("cuMemCreate", byref(handle), size, byref(_prop(device)), 0,
         what=f"cuMemCreate(HOST_NUMA, {size})")  # fmt: skip
    return handle.value, size


def export(handle: int) -> int:
    """A new POSIX fd for the allocation `handle`, to send over a Unix socket. Caller closes it."""
    fd = ctypes.c_int()
    call("cuMemExportToShareableHandle", byref(fd), handle, POSIX_FD, 0)
    return fd.value


def import_fd(fd: int) -> int:
    """The allocation an exported POSIX fd stands for (the fd stays the caller's)."""
    handle = c_uint64()
    # The fd travels in the pointer-sized osHandle argument itself, as cuda.h says for POSIX fds.
    call("cuMemImportFromShareableHandle", byref(handle), fd, POSIX_FD)
    return handle.value


def release(handle: int) -> None:
    call("cuMemRelease", handle)


class HostBuffer:
    """Chunks of VMM host memory mapped at one contiguous address, readable and writable by
    the CPU and by `device` (and `peers`). Imported handles are owned (released on close); the
    daemon's own chunks stay with its pool.

    Mapping costs about 27 ms per GB (cuMemMap + cuMemSetAccess, H200 host), more than the
    18 ms per GB of copying it to the GPU, so a lazy buffer imports and maps chunk by chunk
    (`map_until`) and a first restore overlaps that with the DMA of the mapped chunks.
    """

    def __init__(
        self,
        handles: list[int],
        sizes: list[int],
        device: int,
        owned: bool,
        lazy: bool = False,
        host_access: bool = True,
        peers: tuple[int, ...] = (),
        fds: list[int] | None = None,
    ) -> None:
        self.handles, self.sizes, self.device, self.owned = handles, sizes, device, owned
        self.devices = (device, *(p for p in peers if p != device))
        # CPU access is optional: a process that only DMAs to its GPU skips the CPU page
        # tables of the whole buffer (`enable_host_access` adds them when a CPU copy needs them).
        self.host_access = host_access
        # Exported fds still to import (lazy import): ours, closed once imported or on close.
        self._fds = fds or []
        self.size = sum(sizes)
        self.mapped = 0  # bytes from `addr` that are mapped and accessible
        self._chunks_mapped = 0
        self._lock = threading.Lock()
        self.addr = reserve(self.size)
        if not lazy:
            self.map_until(self.size)

    def map_until(self, end: int) -> None:
        """Map chunks, in address order, until the first `end` bytes are accessible."""
        with self._lock:
            if not self.addr:
                raise CudaError("the pool buffer was closed while a copy still needed it")
            while self.mapped < end and self._chunks_mapped < len(self.sizes):
                i = self._chunks_mapped
                at, size = self.addr + self.mapped, self.sizes[i]
                try:
                    if i == len(self.handles):
                        self.handles.append(import_fd(self._fds[i]))
                        os.close(self._fds[i])
                        self._fds[i] = -1
                    _map(at, size, self.handles[i], _access(self.devices, self.host_access))
                except CudaError:
                    self._close()
                    raise
                self.mapped += size
                self._chunks_mapped += 1

    def enable_host_access(self) -> None:
        """Map the whole buffer with CPU access too (for CPU copies and checksums)."""
        self.map_until(self.size)
        with self._lock:
            if not self.host_access:
                access = _access(self.devices, True)
                call("cuMemSetAccess", self.addr, self.size, access, len(access))
                self.host_access = True

    @classmethod
    def of_handles(
        cls, handles: list[int], sizes: list[int], device: int = 0, peers: tuple[int, ...] = ()
    ) -> HostBuffer:
        """Map allocations this process owns elsewhere (thawd's pool chunks: they stay owned
        there), for `device` and `peers`."""
        cuda.set_device(device)
        return cls(handles, sizes, device, owned=False, peers=peers)

    @classmethod
    def create(cls, size: int, device: int = 0) -> HostBuffer:
        """New page-locked host memory of `size` bytes (rounded up to the VMM granularity)."""
        handle, size = allocate(size, device)
        return cls([handle], [size], device, owned=True)

    @classmethod
    def import_fds(
        cls,
        fds: list[int],
        sizes: list[int],
        device: int = 0,
        lazy: bool = False,
        host_access: bool = True,
    ) -> HostBuffer:
        """Map chunks another process exported, in order; the fds stay owned by the caller.
        `lazy`: import and map each chunk on `map_until` (importing 60 chunks up front costs
        a first restore tens of milliseconds)."""
        t0 = time.perf_counter()
        cuda.set_device(device)
        t_context = time.perf_counter()
        own = []
        try:
            for fd in fds:
                own.append(os.dup(fd))
            buf = cls([], sizes, device, owned=True, lazy=lazy, host_access=host_access, fds=own)
        except BaseException:
            for fd in own:
                os.close(fd)
            raise
        log.debug(
            "%d chunks (%d bytes): context %.1f ms, %d bytes mapped in %.1f ms",
            len(fds),
            buf.size,
            (t_context - t0) * 1e3,
            buf.mapped,
            (time.perf_counter() - t_context) * 1e3,
        )
        return buf

    def export_fd(self) -> int:
        """An fd for a single-chunk buffer (tests and tools). Caller closes it."""
        assert len(self.handles) == 1
        return export(self.handles[0])

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = []
        if not self.addr:
            return
        cuda.set_device(self.device)
        offset = 0
        for size in self.sizes[: self._chunks_mapped]:
            driver.try_call("cuMemUnmap", self.addr + offset, size)
            offset += size
        driver.try_call("cuMemAddressFree", self.addr, self.size)
        if self.owned:
            for h in self.handles:
                driver.try_call("cuMemRelease", h)
        self.handles = []
        self.addr = self.mapped = self._chunks_mapped = 0


class PoolMirror:
    """thawd's whole VMM pool mapped in this process for one GPU: chunk i at addr + i * chunk.

    A process that maps the pool once restores any contiguous pool buffer with no fds,
    imports or maps (DELIVERY_POOL): the ~19 ms that a 16 GB buffer's first restore in a new
    process otherwise spends on them (H200). The chunks' fds are handed over (`offer`) and
    imported (`import_chunk`, which closes the fd) at connect: under 0.1 ms a chunk, 4-5 ms
    for 73 on the H200 host. Each chunk is mapped when first needed (`map_range`: 2.8 ms for
    a 256 MiB chunk without CPU access), by a restore that reaches it or by the background
    thread while no copy holds the map (mapping beside a copy slows the copy). GPU access
    only: CPU copies use the per-buffer mapping.
    """

    def __init__(self, pool_id: int, chunk: int, count: int, device: int) -> None:
        self.id, self.chunk, self.device = pool_id, chunk, device
        self.size = chunk * count
        self._handles: list[int | None] = [None] * count
        self._fds: list[int] = [-1] * count  # handed over and not yet imported
        # Set once a chunk is mapped and accessible, read without a lock: the copy loop asks
        # about every piece it issues, and only a chunk not mapped yet takes its lock.
        self._mapped = [False] * count
        self._locks = [threading.Lock() for _ in range(count)]
        self._users = 0
        self._closing = False
        self._cond = threading.Condition()
        self._access = _access((device,), False)
        cuda.set_device(device)
        self.addr = reserve(self.size)

    def offer(self, start: int, fds: list[int]) -> None:
        """Take the fds of the chunks from `start` (they are the mirror's from now on, closed
        once imported or by `close`); each is imported when first needed."""
        for i, fd in enumerate(fds, start):
            with self._locks[i]:
                if self._fds[i] >= 0:
                    os.close(self._fds[i])
                self._fds[i] = fd

    def import_chunk(self, i: int) -> None:
        """Import chunk i if no one has yet (the background thread, ahead of restores)."""
        if self._handles[i] is None:
            with self._locks[i]:
                self._import(i)

    def _import(self, i: int) -> int:
        """Chunk i's handle, imported from its fd if not yet, with its lock held."""
        handle = self._handles[i]
        if handle is not None:
            return handle
        if self._closing:
            raise CudaError("thawd's pool mapping was released (thawd went away)")
        fd = self._fds[i]
        if fd < 0:
            raise CudaError(f"thawd's pool chunk {i} was never handed over")
        handle = self._handles[i] = import_fd(fd)
        self._fds[i] = -1
        os.close(fd)
        return handle

    def map_range(self, start: int, end: int) -> None:
        """Make pool bytes start..end readable by the GPU, importing and mapping the chunks not
        yet mapped."""
        for i in range(start // self.chunk, -(-end // self.chunk)):
            if self._mapped[i]:
                continue
            with self._locks[i]:
                if self._mapped[i]:
                    continue
                if self._closing:
                    raise CudaError("thawd's pool mapping was released (thawd went away)")
                _map(self.addr + i * self.chunk, self.chunk, self._import(i), self._access)
                self._mapped[i] = True

    def mapped_address(self) -> int | None:
        """The address of a chunk the GPU can read now, if any (the first mapped)."""
        for i, mapped in enumerate(self._mapped):
            if mapped:
                return self.addr + i * self.chunk
        return None

    def mapper(self, start: int) -> Callable[[int], None]:
        """`ensure_mapped(end)` for a buffer at pool offset `start`: maps up to start + end,
        looking only at chunks past those it already made sure of."""
        done = start

        def ensure(end: int) -> None:
            nonlocal done
            if start + end > done:
                self.map_range(done, start + end)
                done = start + end

        return ensure

    def wait_idle(self) -> bool:
        """Wait while restores hold the map; False once it is closing."""
        with self._cond:
            while self._users and not self._closing:
                self._cond.wait()
            return not self._closing

    def acquire(self) -> None:
        """Hold the mapping for a copy: `close` waits until every holder has released it."""
        with self._cond:
            if self._closing:
                raise CudaError("thawd's pool mapping was released (thawd went away)")
            self._users += 1

    def release(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Unmap and release everything, once the copies holding the mapping are done."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._users:
                self._cond.wait()
            if not self.addr:
                return
            cuda.set_device(self.device)
            # Copies left in flight (restore_many) may still read it: never unmap under DMA.
            cuda.device_synchronize()
            for i, lock in enumerate(self._locks):
                with lock:  # after a map in progress on another thread
                    if self._mapped[i]:
                        driver.try_call("cuMemUnmap", self.addr + i * self.chunk, self.chunk)
                        self._mapped[i] = False
            driver.try_call("cuMemAddressFree", self.addr, self.size)
            for handle in self._handles:
                if handle is not None:
                    driver.try_call("cuMemRelease", handle)
            self._handles = []
            for fd in self._fds:
                if fd >= 0:
                    os.close(fd)
            self._fds = []
            self.addr = 0


def _map(at: int, size: int, handle: int, access: ctypes.Array[driver.MemAccessDesc]) -> None:
    """Map `handle` at address `at` and grant `access`; nothing stays mapped if either fails."""
    call("cuMemMap", at, size, 0, handle, 0)
    try:
        call("cuMemSetAccess", at, size, access, len(access))
    except CudaError:
        driver.try_call("cuMemUnmap", at, size)
        raise


def _access(devices: tuple[int, ...], host: bool) -> ctypes.Array[driver.MemAccessDesc]:
    """Read-write access for `devices`, and for the CPU when `host`."""
    locations = [(driver.MEM_LOCATION_TYPE_DEVICE, device) for device in devices]
    if host:
        locations.insert(0, (driver.MEM_LOCATION_TYPE_HOST_NUMA, 0))
    access = (driver.MemAccessDesc * len(locations))()
    for desc, (kind, where) in zip(access, locations, strict=True):
        desc.location.type, desc.location.id = kind, where
        desc.flags = driver.MEM_ACCESS_FLAGS_PROT_READWRITE
    return access
