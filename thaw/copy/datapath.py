"""Moving a payload's bytes between host memory and a model's tensors.

The host side is either a snapshot file (thaw.copy.restore / thaw.copy.freeze) or memory laid
out like the payload (a thawd pool buffer, a mapped file). CPU tensors are copied with the native
multi-threaded loops. CUDA tensors are read from a file by the native loop of
native/readdevice.c (`read_to_cuda`: each thread reads, hashes and copies through its own
pinned bounce buffers); from other host memory through pinned staging slots on two streams,
or straight from host memory that CUDA can already reach (VMM-mapped or registered). What goes
where is thaw.copy.binding's; a daemon copy's export is thaw.copy.daemon_copy's.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from thaw import _native
from thaw.copy.binding import Binding, cuda_device
from thaw.copy.pieces import Piece, Segment, plan
from thaw.format.checksum import Digests, verify_tensor

# 64 MB slots: on H200, 2-stream H2D in 64 MB chunks reaches 55.1 GB/s, 16 MB chunks 52.2.
SLOT_SIZE = 64 << 20
# Host-side workers per pipeline and slots shared among them: two slots per worker, one it
# fills (or drains) while the GPU copies the other.
PIPELINE_WORKERS = 4
SLOTS = 2 * PIPELINE_WORKERS
DEFAULT_THREADS = max(1, min(16, os.cpu_count() or 1))
# A restore's first H2D copy after the link idled for 0.2 s or more ran 2.5% slower: H200
# host, 0.54 GB pinned, 53.2-53.4 GB/s against 54.6 back to back; a 2 MiB copy issued 0.5 ms
# before brought it to 54.7-54.8 (`wake_link`, issued while thawd answers the open).
WAKE_BYTES = 2 << 20
# The file-to-GPU loop reached the link with 12-16 threads on the H200 host; its pinned bounce
# buffers (8 MiB a thread, kept for the process's life) stop growing at 32 threads.
MAX_BOUNCE_THREADS = 32


class Targets:
    """Contiguous destinations for bindings; non-contiguous tensors go through a temporary."""

    def __init__(self, bindings: Sequence[Binding], copy_in: bool = False) -> None:
        """`copy_in`: the temporaries start as copies of the tensors (sources, not targets)."""
        self.bindings = bindings
        self.tensors = [
            b.tensor
            if b.tensor.is_contiguous()
            else b.tensor.contiguous()
            if copy_in
            else torch.empty_like(b.tensor, memory_format=torch.contiguous_format)
            for b in bindings
        ]

    @property
    def temporaries(self) -> bool:
        return any(t is not b.tensor for b, t in zip(self.bindings, self.tensors, strict=True))

    def ptr(self, index: int) -> int:
        return int(self.tensors[index].data_ptr())

    def finish(self) -> None:
        for b, t in zip(self.bindings, self.tensors, strict=True):
            if t is not b.tensor:
                b.tensor.copy_(t)


# --- CPU ------------------------------------------------------------------------------------


def copy_to_cpu(
    bindings: Sequence[Binding],
    fill: Callable[[list[int]], list[bytes] | None],
    digests: Digests | None,
) -> int:
    """Fill the CPU tensors in place with `fill(addrs)` (addrs[i] is binding i's memory), then
    check their checksums. `fill` returns each tensor's block hashes when it hashed the bytes
    as they landed (`_native.pread_hashed`), else None and they are hashed here."""

    targets = Targets(bindings)
    addrs = [targets.ptr(i) for i in range(len(bindings))]
    hashes = fill(addrs)
    if digests is not None:
        for i, b in enumerate(bindings):
            if hashes is not None:
                digests.check_whole(i, hashes[i])
            else:
                digests.check(Segment(i, 0, 0, b.entry.length), addrs[i])
    targets.finish()
    return sum(b.entry.length for b in bindings)


# --- CUDA -----------------------------------------------------------------------------------


class Staging:
    """Pinned slots with an event each and two streams, and the native file reader's bounce
    buffers, made once per device and process."""

    _cache: dict[int, Staging] = {}
    _cache_lock = threading.Lock()

    def __init__(self, device: int) -> None:
        from thaw.mem import cuda

        cuda.set_device(device)
        self.device = device
        self.lock = threading.Lock()  # one pipeline at a time uses these slots
        self.streams = [cuda.Stream(), cuda.Stream()]
        self.in_flight = False  # direct copies issued and not yet waited for (finish_copies)
        self.events = [cuda.Event() for _ in range(SLOTS)]
        self._slots: list[Any] = []
        self._bounce: Any = None
        # wake_link's: a stream of its own (no restore's copy waits behind it) and a device
        # buffer nothing reads.
        self.wake_stream = cuda.Stream()
        self.wake_target = torch.empty(WAKE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")

    @property
    def slots(self) -> list[Any]:
        """The pinned slots, allocated on first use: copies straight from GPU-accessible pool
        memory never need them, and 512 MB of cudaHostAlloc costs a new process ~0.1 s."""
        if not self._slots:
            from thaw.mem import cuda

            self._slots = [cuda.PinnedBuffer(SLOT_SIZE) for _ in range(SLOTS)]
        return self._slots

    def bounce(self, threads: int) -> list[int]:
        """Two pinned bounce buffers per thread for `_native.read_to_device` (4 MiB each: 128
        MB for 16 threads), allocated on first use and grown for more threads, up to
        MAX_BOUNCE_THREADS (the native loop runs as many threads as it has buffer pairs)."""
        from thaw.mem import cuda

        threads = max(1, min(threads, MAX_BOUNCE_THREADS))
        size = 2 * threads * _native.BOUNCE_SIZE
        if self._bounce is None or self._bounce.size < size:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = cuda.PinnedBuffer(size)
        return [self._bounce.addr + i * _native.BOUNCE_SIZE for i in range(2 * threads)]

    @classmethod
    def for_device(cls, device: int) -> Staging:
        with cls._cache_lock:
            if device not in cls._cache:
                cls._cache[device] = cls(device)
            return cls._cache[device]


def warm_up(device: int) -> None:
    """Create `device`'s streams and events now, and make the context current once: a
    process's first restore should not pay for them (connect() calls this in a process that
    uses CUDA)."""
    from thaw.mem import cuda

    staging = Staging.for_device(device)
    with staging.lock:
        cuda.set_device(device)
        for stream in staging.streams:
            stream.synchronize()


def wake_link(device: int, source: int, readable: int) -> None:
    """Start a copy of WAKE_BYTES (fewer if only `readable` bytes there are) from `source`
    (host memory `device` can read, such as a mapped chunk of thawd's pool) into a scratch
    buffer of `device`, and return at once: a restore calls it before it waits for thawd's
    reply to its open, so that the link and copy engine are awake when the restore's own
    copies start. Nothing waits for it or reads what it writes; the restore's copies start
    after it (they begin with a device synchronize)."""
    from thaw.mem import cuda

    staging = Staging.for_device(device)
    cuda.set_device(device)
    length = min(readable, WAKE_BYTES)
    cuda.copy_h2d(staging.wake_target.data_ptr(), source, length, staging.wake_stream)


class _Workers:
    """Host-side workers of a pipeline: each takes a piece and a free slot, does its part
    (read + verify, or hash + write) and hands the slot on. Several pieces are in flight at
    once so that the disk queue stays full while other pieces are hashed or copied."""

    def __init__(self, staging: Staging, pieces: Sequence[Piece], count: int) -> None:
        self.staging = staging
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(SLOTS):
            self.free.put(slot)
        self.todo: queue.Queue[Piece] = queue.Queue()
        for piece in pieces:
            self.todo.put(piece)
        self.done: queue.Queue[tuple[Piece, int] | None] = queue.Queue()
        self.failure: list[BaseException] = []
        self.stop = threading.Event()
        self.count = count
        self.threads: list[threading.Thread] = []

    def start(self, target: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as e:
                self.failure.append(e)
                self.done.put(None)  # wake the coordinating thread
                self.free.put(0)  # and a producer waiting for a slot

        for n in range(self.count):
            t = threading.Thread(target=run, name=f"{name}-{n}", daemon=True)
            t.start()
            self.threads.append(t)

    def take_slot(self) -> int | None:
        slot = self.free.get()
        return None if self.stop.is_set() or self.failure else slot

    def close(self) -> None:
        self.stop.set()
        for _ in self.threads:
            self.free.put(0)  # wake workers blocked on a slot; they see `stop` and leave
        for t in self.threads:
            t.join()
        if self.failure:
            raise self.failure[0]


def _stream_for(staging: Staging, slot: int) -> Any:
    return staging.streams[slot % 2]


def copy_to_cuda(
    bindings: Sequence[Binding],
    fill: Callable[[int, Piece], None],
    digests: Digests | None,
) -> int:
    """Host-to-device restore through pinned staging.

    Reader workers fill free slots (`fill(slot_addr, piece)`: a memcpy from host memory; files
    go through `read_to_cuda`) and, with `digests`, check checksums; this thread issues the H2D
    copies on alternating streams and hands a slot back, with the event that says its copy is
    done, as soon as the copies are queued.
    """
    from thaw.mem import cuda

    device = cuda_device(bindings)
    assert device is not None
    staging = Staging.for_device(device)
    pieces = plan([b.entry for b in bindings], SLOT_SIZE)
    targets = Targets(bindings)
    copied = 0
    with staging.lock:
        cuda.set_device(device)
        cuda.device_synchronize()  # no kernel may still use the tensors we overwrite
        workers = _Workers(staging, pieces, min(PIPELINE_WORKERS, max(1, len(pieces))))

        def read() -> None:
            cuda.set_device(device)
            while not workers.stop.is_set():
                try:
                    piece = workers.todo.get_nowait()
                except queue.Empty:
                    return
                slot = workers.take_slot()
                if slot is None:
                    return
                staging.events[slot].synchronize()  # its previous H2D has finished
                addr = staging.slots[slot].addr
                fill(addr, piece)
                if digests is not None:
                    for seg in piece.segments:
                        digests.check(seg, addr + seg.piece_offset)
                workers.done.put((piece, slot))

        workers.start(read, "thaw-restore-reader")
        try:
            for _ in pieces:
                item = workers.done.get()
                if item is None:
                    break
                piece, slot = item
                stream = _stream_for(staging, slot)
                base = staging.slots[slot].addr
                for seg in piece.segments:
                    if seg.length:
                        cuda.copy_h2d(
                            targets.ptr(seg.index) + seg.tensor_offset,
                            base + seg.piece_offset,
                            seg.length,
                            stream,
                        )
                    copied += seg.length
                staging.events[slot].record(stream)
                workers.free.put(slot)
        finally:
            try:
                workers.close()
            finally:
                for stream in staging.streams:
                    stream.synchronize()
    targets.finish()
    return copied


def read_to_cuda(
    bindings: Sequence[Binding],
    fd: int,
    payload_offset: int,
    align: int,
    digests: Digests | None,
    threads: int,
) -> int:
    """File to GPU: each tensor read from `fd` (its payload at `payload_offset`; `align` 4096
    for an O_DIRECT fd) by the native loop of native/readdevice.c: each thread reads and hashes
    4 MiB at a time into its own pinned bounce buffer and copies it on its own stream, 53 GB/s
    from the page cache on the H200 host where the slot pipeline reached 25-29. With `digests`,
    every tensor's block hashes, taken in the bounce buffers before their copy, are checked."""
    from thaw.mem import cuda

    device = cuda_device(bindings)
    assert device is not None
    staging = Staging.for_device(device)
    targets = Targets(bindings)
    lengths = [b.entry.length for b in bindings]
    with staging.lock:
        cuda.set_device(device)
        cuda.device_synchronize()  # no kernel may still use the tensors we overwrite
        hashes = cuda.read_to_device(
            fd, [targets.ptr(i) for i in range(len(bindings))],
            [payload_offset + b.entry.offset for b in bindings], lengths,
            staging.bounce(threads), threads, align, digests is not None,
        )  # fmt: skip
    if digests is not None:
        assert hashes is not None
        for i, digest in enumerate(hashes):
            digests.check_whole(i, digest)
    targets.finish()
    return sum(lengths)


def _copy_direct(
    bindings: Sequence[Binding],
    ensure_mapped: Callable[[int], None] | None,
    issue: Callable[[Segment, int, Any], None],
    in_flight: bool = False,
) -> None:
    """The loop of both direct copies: 64 MB copies alternating two streams (the measured way
    to reach the link's ceiling), `issue(segment, payload_offset, stream)` for each. With
    `ensure_mapped(end)`, each copy is issued once the host memory it touches is mapped: a
    buffer still being mapped maps on while the earlier copies run. `in_flight`: return once
    issued, after copies this thread left in flight before (see `finish_copies`)."""
    from thaw.mem import cuda

    device = cuda_device(bindings)
    assert device is not None
    staging = Staging.for_device(device)
    with staging.lock:
        cuda.set_device(device)
        # The tensors are final (freeze) or unused (restore); copies that continue a batch left
        # in flight need no wait: our own streams order them after the batch's earlier ones.
        if not (in_flight and staging.in_flight):
            cuda.device_synchronize()
        staging.in_flight = in_flight
        for n, piece in enumerate(plan([b.entry for b in bindings], SLOT_SIZE)):
            stream = staging.streams[n % 2]
            for seg in piece.segments:
                if seg.length:
                    offset = bindings[seg.index].entry.offset + seg.tensor_offset
                    if ensure_mapped is not None:
                        ensure_mapped(offset + seg.length)
                    issue(seg, offset, stream)
        if not in_flight:
            for stream in staging.streams:
                stream.synchronize()


def finish_copies(device: int) -> None:
    """Wait for the direct copies left in flight on `device` (`in_flight=True`)."""
    staging = Staging.for_device(device)
    with staging.lock:
        for stream in staging.streams:
            stream.synchronize()
        staging.in_flight = False


def copy_direct_to_cuda(
    bindings: Sequence[Binding],
    base_addr: int,
    ensure_mapped: Callable[[int], None] | None = None,
    in_flight: bool = False,
) -> int:
    """H2D straight from GPU-accessible host memory laid out like the payload (a pool buffer).
    `in_flight`: return once the copies are issued, when no temporaries need them done; the
    caller calls `finish_copies(device)` before the tensors are used."""
    from thaw.mem import cuda

    targets = Targets(bindings)
    in_flight = in_flight and not targets.temporaries
    _copy_direct(
        bindings,
        ensure_mapped,
        lambda seg, offset, stream: cuda.copy_h2d(
            targets.ptr(seg.index) + seg.tensor_offset, base_addr + offset, seg.length, stream
        ),
        in_flight,
    )
    targets.finish()
    return sum(b.entry.length for b in bindings)


def copy_from_cuda(
    bindings: Sequence[Binding],
    drain: Callable[[int, Piece], None],
) -> None:
    """Device-to-host through pinned staging: D2H on two streams from this thread, and
    `drain(slot_addr, piece)` (hash and write) on writer workers, overlapped. Gaps between
    tensors in a slot are zeroed so a snapshot's bytes do not depend on the slot's history."""
    from thaw.mem import cuda

    device = cuda_device(bindings)
    assert device is not None
    staging = Staging.for_device(device)
    sources = [b.tensor.contiguous() for b in bindings]
    pieces = plan([b.entry for b in bindings], SLOT_SIZE)
    with staging.lock:
        cuda.set_device(device)
        cuda.device_synchronize()  # the weights are final before we read them
        workers = _Workers(staging, [], PIPELINE_WORKERS)

        def write() -> None:
            cuda.set_device(device)
            while (item := workers.done.get()) is not None:
                piece, slot = item
                staging.events[slot].synchronize()
                addr = staging.slots[slot].addr
                _zero_gaps(addr, piece)
                drain(addr, piece)
                workers.free.put(slot)

        workers.start(write, "thaw-freeze-writer")
        try:
            for piece in pieces:
                slot = workers.take_slot()
                if slot is None:
                    break
                stream = _stream_for(staging, slot)
                base = staging.slots[slot].addr
                for seg in piece.segments:
                    if seg.length:
                        cuda.copy_d2h(
                            base + seg.piece_offset,
                            int(sources[seg.index].data_ptr()) + seg.tensor_offset,
                            seg.length,
                            stream,
                        )
                staging.events[slot].record(stream)
                workers.done.put((piece, slot))
        finally:
            for _ in range(workers.count):
                workers.done.put(None)  # each writer leaves after the queued pieces
            workers.close()


def copy_direct_from_cuda(
    bindings: Sequence[Binding],
    base_addr: int,
    ensure_mapped: Callable[[int], None] | None = None,
) -> None:
    """D2H straight into GPU-accessible host memory laid out like the payload (freeze to pool)."""
    from thaw.mem import cuda

    sources = [b.tensor.contiguous() for b in bindings]
    _copy_direct(
        bindings,
        ensure_mapped,
        lambda seg, offset, stream: cuda.copy_d2h(
            base_addr + offset,
            int(sources[seg.index].data_ptr()) + seg.tensor_offset,
            seg.length,
            stream,
        ),
    )


def _zero_gaps(addr: int, piece: Piece) -> None:
    pos = 0
    for seg in sorted(piece.segments, key=lambda s: s.piece_offset):
        if seg.piece_offset > pos:
            ctypes.memset(addr + pos, 0, seg.piece_offset - pos)
        pos = seg.piece_offset + seg.length
    if piece.length > pos:
        ctypes.memset(addr + pos, 0, piece.length - pos)


# --- host memory laid out like the payload (pool buffers, mapped files) ----------------------


def copy_to_tensors(
    bindings: Sequence[Binding],
    base_addr: int,
    *,
    gpu_accessible: bool = False,
    verify: bool = False,
    path: object = "<memory>",
    threads: int = DEFAULT_THREADS,
    ensure_mapped: Callable[[int], None] | None = None,
    in_flight: bool = False,
) -> int:
    """Restore bound tensors from host memory where tensor i lies at base_addr + entry.offset.

    `gpu_accessible`: the memory is VMM-mapped or registered with CUDA, so H2D runs from it
    directly; otherwise CUDA tensors are staged through pinned slots. `ensure_mapped(end)`:
    the memory is still being mapped; call before reading up to payload offset `end`.
    `in_flight`: direct copies to CUDA may still run on return; `finish_copies(device)` waits.
    Returns bytes copied.
    """
    cpu = [b for b in bindings if b.tensor.device.type == "cpu"]
    gpu = [b for b in bindings if b.tensor.device.type == "cuda"]
    if ensure_mapped is not None and (cpu or verify or not gpu_accessible):
        ensure_mapped(max((b.entry.offset + b.entry.length for b in bindings), default=0))
        ensure_mapped = None
    total = 0
    if cpu:
        if verify:
            for b in cpu:
                verify_tensor(path, b.entry, base_addr + b.entry.offset, threads)
        targets = Targets(cpu)
        _native.copy_many(
            [targets.ptr(i) for i in range(len(cpu))],
            [base_addr + b.entry.offset for b in cpu],
            [b.entry.length for b in cpu],
            threads,
        )
        targets.finish()
        total += sum(b.entry.length for b in cpu)
    if gpu:
        if gpu_accessible and not verify:
            total += copy_direct_to_cuda(gpu, base_addr, ensure_mapped, in_flight)
        else:
            per_worker = max(1, threads // PIPELINE_WORKERS)
            gpu_digests = Digests([b.entry for b in gpu], path, per_worker) if verify else None
            total += copy_to_cuda(
                gpu,
                lambda addr, p: _native.copy(
                    addr, base_addr + p.payload_offset, p.length, per_worker
                ),
                gpu_digests,
            )
    return total


def copy_from_tensors(
    bindings: Sequence[Binding],
    base_addr: int,
    *,
    gpu_accessible: bool = False,
    threads: int = DEFAULT_THREADS,
    ensure_mapped: Callable[[int], None] | None = None,
) -> int:
    """Freeze bound tensors into host memory laid out like the payload (a pool buffer)."""
    cpu = [b for b in bindings if b.tensor.device.type == "cpu"]
    gpu = [b for b in bindings if b.tensor.device.type == "cuda"]
    if ensure_mapped is not None and (cpu or not gpu_accessible):
        ensure_mapped(max((b.entry.offset + b.entry.length for b in bindings), default=0))
        ensure_mapped = None
    sources = [b.tensor.contiguous() for b in cpu]
    _native.copy_many(
        [base_addr + b.entry.offset for b in cpu],
        [int(t.data_ptr()) for t in sources],
        [b.entry.length for b in cpu],
        threads,
    )
    if gpu:
        if gpu_accessible:
            copy_direct_from_cuda(gpu, base_addr, ensure_mapped)
        else:
            per_worker = max(1, threads // PIPELINE_WORKERS)
            copy_from_cuda(
                gpu,
                lambda addr, p: _native.copy(
                    base_addr + p.payload_offset, addr, p.length, per_worker
                ),
            )
    return sum(b.entry.length for b in bindings)
