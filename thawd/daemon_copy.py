"""Daemon copy, thawd's side: open the CUDA IPC handles a client exported
(thaw/copy/daemon_copy.py) and copy between them and the pinned pool."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from thaw.errors import InvalidRequest
from thaw.mem import cuda
from thaw.mem.driver import IPC_HANDLE_SIZE

# 64 MB copies alternating two streams: the measured way to the link's ceiling (DESIGN.md).
PIECE = 64 << 20


@dataclasses.dataclass(frozen=True)
class Job:
    host_offset: int  # from the pool buffer's address
    region: int
    region_offset: int
    length: int


class Copier:
    """The daemon's side: opens clients' handles and copies into them from pool memory.

    Opened handles are kept per client connection (`forget` closes them when it ends): opening
    costs ~0.8 ms each and an engine restoring again sends the same allocations. A handle names
    one allocation for good (CUDA gives a re-allocated address a new handle), so a cached
    mapping is never another allocation's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, int] = {}
        self._streams: dict[int, list[cuda.Stream]] = {}
        self._device_locks: dict[int, threading.Lock] = {}
        self._opened: dict[str, dict[bytes, tuple[int, int]]] = {}  # owner -> handle -> (dev, ptr)

    def device_for(self, uuid: str) -> int:
        """This process's index of the GPU with `uuid`."""
        with self._lock:
            if not self._devices:
                self._devices = {cuda.device_uuid(i): i for i in range(cuda.device_count())}
            if uuid not in self._devices:
                raise InvalidRequest(
                    f"thawd does not see GPU {uuid} (it sees {sorted(self._devices) or 'none'}): "
                    "run thawd where every engine's GPU is visible to it"
                )
            return self._devices[uuid]

    def copy(
        self,
        owner: str,
        uuid: str,
        host: int,
        handles: Sequence[tuple[bytes, int]],
        jobs: Sequence[Job],
        to_host: bool = False,
    ) -> None:
        """Copy `jobs` from host address `host` into the regions `handles` name on `uuid`'s
        GPU (`to_host`: the other way); returns once the bytes are there. Every job must lie
        inside its region."""
        device = self.device_for(uuid)
        for job in jobs:
            region = handles[job.region][1] if job.region < len(handles) else -1
            if job.region_offset + job.length > region:
                raise InvalidRequest(
                    f"a copy of {job.length} bytes at offset {job.region_offset} "
                    f"does not fit region {job.region}"
                )
        with self._lock:
            lock = self._device_locks.setdefault(device, threading.Lock())
        with lock:
            cuda.set_device(device)
            streams = self._streams.get(device)
            if streams is None:
                streams = self._streams[device] = [cuda.Stream(), cuda.Stream()]
            ptrs = [self._open(owner, device, h) for h, _ in handles]
            n = 0
            for job in jobs:
                for at in range(0, job.length, PIECE):
                    length = min(PIECE, job.length - at)
                    gpu = ptrs[job.region] + job.region_offset + at
                    if to_host:
                        cuda.copy_d2h(host + job.host_offset + at, gpu, length, streams[n % 2])
                    else:
                        cuda.copy_h2d(gpu, host + job.host_offset + at, length, streams[n % 2])
                    n += 1
            for s in streams:
                s.synchronize()

    def _open(self, owner: str, device: int, handle: bytes) -> int:
        if len(handle) != IPC_HANDLE_SIZE:
            raise InvalidRequest(f"an IPC handle is {IPC_HANDLE_SIZE} bytes, not {len(handle)}")
        with self._lock:  # against `forget` of the same owner
            opened = self._opened.setdefault(owner, {})
            if handle not in opened:
                opened[handle] = (device, cuda.ipc_open(handle))
            return opened[handle][1]

    def forget(self, owner: str) -> None:
        """Close the handles a client connection opened (it went away). Blocks while a copy on
        the same GPU runs: call it off the event loop."""
        with self._lock:
            opened = self._opened.pop(owner, {})
            locks = dict(self._device_locks)
        for device, ptr in opened.values():
            with locks.get(device, self._lock):  # after a copy of the owner's still running
                cuda.set_device(device)
                cuda.ipc_close(ptr)

    def close(self) -> None:
        for owner in list(self._opened):
            self.forget(owner)
