"""Where a snapshot's bytes are held: pin (pool memory), warm (page cache), unpin, verify.

Bytes come from the snapshot's registered fd only, never from its name, and every tensor is
checked against its checksum as it lands in the pool: the pinned tier holds verified bytes
from then on. A file that changed since it was registered (SnapshotChanged) is not read.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from thaw import _native
from thaw._proto import thawd_pb2 as pb
from thaw.errors import ChecksumMismatch, DaemonError, InvalidRequest
from thaw.format import TensorEntry
from thaw.format.checksum import verify_hashes, verify_tensor
from thaw.format.residency import resident_estimate
from thawd.budgets import human
from thawd.buffers import PoolBuffer, WarmMapping
from thawd.entries import Entry
from thawd.files import SnapshotFile, verify_file
from thawd.security import Peer

if TYPE_CHECKING:
    from thawd.state import Daemon

# Reads into the pool go in groups of tensors of about 1 GiB, each one pread_hashed call over
# all its 16 MiB blocks: 256 MiB groups left most of 16 threads idle at each group's tail
# (a pin from the page cache at 16 GB/s on the H200 host); 1 GiB still gives a progress
# message about every 0.7 s from a disk at 1.4 GB/s.
PIN_CHUNK = 1 << 30

Groups = list[list[TensorEntry]]
# Reads a payload into a pool buffer, group by group, calling done(end) once a group is in
# and verified (on a worker thread).
Reader = Callable[[PoolBuffer, Groups, Callable[[int], None]], None]
Explain = Callable[[BaseException], Awaitable[None]]


class Tiers:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def pin(self, peer: Peer, name: str, tier: str) -> AsyncIterator[pb.PinProgress]:
        """Hold `name` in `tier` ("pinned" or "warm"), yielding progress; the last message
        carries the snapshot's record."""
        d = self.d
        entry = d.owned(peer, name, "pin")
        if entry.busy:
            raise InvalidRequest(f"snapshot {name!r} is already {entry.busy}")
        t0 = time.monotonic()
        if entry.tier == tier or (tier == "warm" and entry.tier == "pinned"):
            entry.row.wanted_tier = tier
            await d.save(entry)
            yield pb.PinProgress(done_bytes=entry.payload_length, total_bytes=entry.payload_length,
                                 done=True, snapshot=entry.record())  # fmt: skip
            return
        if entry.object is not None and tier != "pinned":
            raise InvalidRequest(f"snapshot {name!r} is in object storage: it is pinned or "
                                 "cold (warm is the page cache of a local file)")  # fmt: skip
        file = entry.the_file() if entry.object is None else None
        # Busy before the first await: a second pin of the same snapshot is refused, never run
        # beside this one (two fills would both take budget for one snapshot).
        entry.busy = "pinning" if tier == "pinned" else "warming"
        try:
            if file is not None:
                await d.check_file(peer.uid, entry, file)
            size = d.budgets.size(tier, entry.payload_length)
            d.budgets.promise(tier, size, name)
            try:
                if tier == "pinned":
                    fill = self.fill_file(peer.uid, entry, file) if file is not None else \
                        d.objects.fill(peer.uid, entry)  # fmt: skip
                    async for done in fill:
                        yield pb.PinProgress(done_bytes=done, total_bytes=entry.payload_length,
                                             elapsed_s=time.monotonic() - t0)  # fmt: skip
                else:
                    assert file is not None
                    entry.warm = await d.on_thread(peer.uid, WarmMapping, file,
                                                   d.config.io_threads, d.config.mlock)  # fmt: skip
                    d.memory_locked &= entry.warm.locked or not d.config.mlock
                    entry.tier = "warm"
            finally:
                d.budgets.keep(tier, size)
        finally:
            entry.busy = ""
        entry.row.wanted_tier = tier
        entry.row.error = ""
        await d.save(entry)
        elapsed = time.monotonic() - t0
        d.events.publish("pinned" if tier == "pinned" else "warmed", name,
                         f"{human(entry.payload_length)} in {elapsed:.2f} s",
                         entry.payload_length, elapsed)  # fmt: skip
        yield pb.PinProgress(done_bytes=entry.payload_length, total_bytes=entry.payload_length,
                             elapsed_s=elapsed, done=True, snapshot=entry.record())  # fmt: skip

    def fill_file(self, uid: int, entry: Entry, file: SnapshotFile,
                  explain: Explain | None = None) -> AsyncIterator[int]:  # fmt: skip
        """Read the payload from `file` (the registered file, or a cached copy of an object)
        into a new pool buffer, each 16 MiB block hashed as it lands (`_native.pread_hashed`):
        every tensor is verified in the same pass that reads it. `explain`: what a failure
        means (default: the registered file's `_explain`)."""
        offset = entry.payload_offset
        threads = self.d.config.io_threads

        def read(buf: PoolBuffer, groups: Groups, done: Callable[[int], None]) -> None:
            direct, align = file.direct()
            try:
                for group in groups:
                    start, end = group[0].offset, group[-1].offset + group[-1].length
                    # Pages already in the page cache are copied from it (memory speed); only
                    # a mostly cold range goes around it with O_DIRECT (disk speed, and no
                    # second copy of a large file evicting what the host keeps cached).
                    resident = resident_estimate(file.fd, offset + start, end - start)
                    cached = not align or resident >= (end - start) // 2
                    hashes = _native.pread_hashed(
                        file.fd if cached else direct, [buf.addr + t.offset for t in group],
                        [offset + t.offset for t in group], [t.length for t in group], threads,
                        0 if cached else align)  # fmt: skip
                    for t, digest in zip(group, hashes, strict=True):
                        verify_hashes(file.path, t, digest)
                    done(end)
            finally:
                os.close(direct)

        async def pin_failed(e: BaseException) -> None:
            await self._explain(uid, entry, file, e, "pin_failed")

        return self.fill(uid, entry, read, explain or pin_failed)

    async def fill(self, uid: int, entry: Entry, read: Reader,
                   explain: Explain) -> AsyncIterator[int]:  # fmt: skip
        """Fill a new pool buffer with the entry's payload by `read(buffer, groups, done)` on
        one of `uid`'s threads, yielding each group's end as `read` reports it verified; the
        buffer is the entry's once `read` returned. On failure the buffer is freed (once
        `read` has returned) and `explain(error)` may raise a better error."""
        d = self.d
        assert entry.manifest is not None
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[int | BaseException] = asyncio.Queue()
        buf = await asyncio.to_thread(PoolBuffer, d.pool_kind, entry.row.name, entry.payload_length,
                                      d.config.mlock, d.arena)  # fmt: skip
        groups = _groups(sorted(entry.manifest.tensors, key=lambda t: t.offset), PIN_CHUNK)

        def work() -> None:
            def done(end: int) -> None:
                loop.call_soon_threadsafe(progress.put_nowait, end)

            read(buf, groups, done)
            buf.finish()

        def finished(fut: asyncio.Future[None]) -> None:
            progress.put_nowait(fut.exception() or -1)

        future = asyncio.ensure_future(d.on_thread(uid, work))
        future.add_done_callback(finished)
        try:
            while True:
                item = await progress.get()
                if isinstance(item, BaseException):
                    raise item
                if item < 0:
                    break
                yield item
        except BaseException as e:
            await asyncio.wait([future])  # never free memory a worker is still writing
            buf.close()
            await explain(e)
            raise
        entry.release()
        entry.pool, entry.tier = buf, "pinned"
        entry.row.checksum_state = "verified"
        d.memory_locked &= buf.locked or not d.config.mlock

    async def _explain(self, uid: int, entry: Entry, file: SnapshotFile, error: BaseException,
                       event: str) -> None:  # fmt: skip
        """A read from the file failed: a changed file says so (SnapshotChanged), a checksum
        mismatch in an unchanged file marks the snapshot corrupt, an I/O error becomes a
        DaemonError naming the file."""
        if not isinstance(error, ChecksumMismatch | EOFError | OSError):
            return
        await self.d.check_file(uid, entry, file)  # raises SnapshotChanged when that is the cause
        if isinstance(error, ChecksumMismatch):
            self.mark_corrupt(entry, event, error)
            return
        raise DaemonError(f"{file.path}: reading it failed ({error})") from error

    def mark_corrupt(self, entry: Entry, event: str, error: ChecksumMismatch) -> None:
        """A tensor did not match its checksum: record it, durably, and tell the watchers."""
        entry.row.checksum_state, entry.row.error = "corrupt", str(error)
        self.d.save(entry)
        self.d.events.publish(event, entry.row.name, str(error))

    async def verify(self, peer: Peer, name: str) -> pb.VerifyResponse:
        """Re-check every tensor against its checksum where the bytes are now: the pool buffer
        when pinned (bit rot in memory), else the registered file (read with pread, never
        mapped). A mismatch marks the snapshot corrupt and raises ChecksumMismatch."""
        d = self.d
        entry = d.owned(peer, name, "verify")
        if entry.manifest is None:
            raise InvalidRequest(f"snapshot {name!r} is unusable: {entry.row.error}")
        if entry.busy or entry.file_pending:
            raise InvalidRequest(f"snapshot {name!r} is busy ({entry.busy or 'writing'}); retry")
        manifest, pool, threads = entry.manifest, entry.pool, d.config.io_threads
        file = None if pool is not None else entry.the_file()
        t0 = time.monotonic()
        entry.busy = "verifying"
        try:
            if file is not None:
                await d.check_file(peer.uid, entry, file)

            def work() -> str:
                if pool is not None:
                    for t in manifest.tensors:
                        verify_tensor(f"thawd:{name}", t, pool.addr + t.offset, threads)
                    return "pool"
                assert file is not None
                verify_file(file, manifest.tensors, threads)
                return "file"

            try:
                source = await d.on_thread(peer.uid, work)
            except (ChecksumMismatch, EOFError, OSError) as e:
                if file is None:
                    assert isinstance(e, ChecksumMismatch)
                    self.mark_corrupt(entry, "verify_failed", e)
                    raise
                await self._explain(peer.uid, entry, file, e, "verify_failed")
                raise
        finally:
            entry.busy = ""
        elapsed = time.monotonic() - t0
        entry.row.checksum_state, entry.row.error = "verified", ""
        await d.save(entry)
        d.events.publish("verified", name, f"{human(entry.payload_length)} from the {source}",
                         entry.payload_length, elapsed)  # fmt: skip
        return pb.VerifyResponse(snapshot=entry.record(), bytes=entry.payload_length,
                                 duration_s=elapsed, source=source)  # fmt: skip

    async def unpin(self, peer: Peer, name: str) -> pb.Snapshot:
        """Drop the snapshot to cold and keep it there. Memory first: the registry records the
        wanted tier when it can (a full disk never keeps pinned memory held)."""
        entry = self.d.owned(peer, name, "unpin")
        entry.check_idle()
        entry.row.wanted_tier = "cold"
        entry.release()
        await self.d.save(entry)
        self.d.events.publish("unpinned", name)
        return entry.record()


def _groups(tensors: Sequence[TensorEntry], size: int) -> list[list[TensorEntry]]:
    """Consecutive tensors in groups of about `size` bytes (a larger tensor is its own)."""
    groups: list[list[TensorEntry]] = [[]]
    for t in tensors:
        if groups[-1] and t.offset + t.length - groups[-1][0].offset > size:
            groups.append([])
        groups[-1].append(t)
    return [g for g in groups if g]
