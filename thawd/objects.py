"""Snapshots in object storage as the daemon holds them: register, load at start, pin.

An object's snapshot is registered like a file's (a name, an owner, a manifest read once,
an identity: its size and ETag), is cold until pinned, and is pinned or cold only: its bytes
reach clients from the pool, never from the store. A pin reads a cached copy when the node
has a valid one (verified as any file is), else the store (thawd/s3/fill.py), and then
caches what it read. Every call into boto3 blocks: all of them run on worker threads.

Which objects thawd touches is the operator's choice, not the client's: `[s3] allow`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from thaw._proto import thawd_pb2 as pb
from thaw.errors import ChecksumMismatch, DaemonError, SnapshotError
from thawd.buffers import PoolBuffer
from thawd.config import ConfigError
from thawd.entries import Entry
from thawd.files import SnapshotFile
from thawd.registry import new_row
from thawd.s3 import fill as s3fill
from thawd.s3.cache import Cache
from thawd.s3.config import ObjectRef
from thawd.s3.objects import SnapshotObject
from thawd.s3.store import Store
from thawd.security import Peer, validate_name

if TYPE_CHECKING:
    from thawd.state import Daemon
    from thawd.tiers import Groups

log = logging.getLogger("thawd.objects")


class Objects:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        c = daemon.config.s3
        self.store = Store(c) if c.enabled else None
        try:
            self.cache = Cache(c.cache_dir, c.cache_bytes) if c.enabled and c.cache_dir else None
        except OSError as e:  # thawd does not start on a cache it cannot trust or use
            raise ConfigError(f"[s3] cache_dir = {c.cache_dir!r}: {e}") from None

    def _store(self, ref: ObjectRef, action: str) -> Store:
        """The store, if the operator's allow list admits `ref` (PermissionDenied if not)."""
        self.d.config.s3.check(ref, action)
        assert self.store is not None
        return self.store

    def writable(self, ref: ObjectRef) -> Store:
        """The store for a freeze into `ref`, if the allow list admits it."""
        return self._store(ref, "write")

    async def register(self, peer: Peer, uri: str, name: str,
                       labels: dict[str, str]) -> pb.Snapshot:  # fmt: skip
        """Register the snapshot object at `uri` under `name` (default: its key's last part)."""
        d = self.d
        ref = ObjectRef.parse(uri)
        store = self._store(ref, "read")
        name = name or validate_name(ref.basename.removesuffix(".thaw"))
        fetched = await d.on_thread(peer.uid, SnapshotObject.fetch, store, ref)
        async with d.parses:
            obj = await d.on_thread(peer.uid, fetched.parse)
        entry = Entry(new_row(name, ref.uri, labels, peer.uid))
        entry.attach_object(obj)
        await d.on_thread(peer.uid, entry.prepare)
        d.claim(peer, name, entry)
        await d.save(entry)
        d.events.publish("registered", name, ref.uri, entry.payload_length)
        return entry.record()

    async def load(self, entry: Entry) -> None:
        """Take up a registered object at start: from the cache when it holds this version
        (no network: a node restarts with its store unreachable), else from the store, which
        must still hold the object registered (same ETag)."""
        row = entry.row
        ref = ObjectRef.parse(row.path)
        store = self._store(ref, "read")
        cached = await asyncio.to_thread(self._cached, ref, row.object_etag, row.file_size,
                                    row.content_id)  # fmt: skip
        if cached is not None:
            snapshot = dataclasses.replace(cached.snapshot, path=Path(ref.uri))
            obj = SnapshotObject(ref, row.file_size, row.object_etag, snapshot)
            cached.close()
        else:
            fetched = await asyncio.to_thread(SnapshotObject.fetch, store, ref, row.object_etag)
            async with self.d.parses:
                obj = await asyncio.to_thread(fetched.parse)
        entry.attach_object(obj)
        await asyncio.to_thread(entry.prepare)

    async def fill(self, uid: int, entry: Entry) -> AsyncIterator[int]:
        """Pin the entry's object: from its cached copy when valid, else from the store."""
        d, obj = self.d, entry.object
        assert obj is not None
        store = self._store(obj.ref, "read")
        if self.cache is not None:
            cached = await d.on_thread(uid, self._cached, obj.ref, obj.etag, obj.size,
                                       obj.snapshot.manifest.content_id)  # fmt: skip
            if cached is not None:
                log.info("pinning %s from the cache (%s)", obj.ref.uri, cached.path)
                try:
                    async for end in d.tiers.fill_file(uid, entry, cached, self._nothing):
                        yield end
                    return
                except (SnapshotError, DaemonError, OSError, EOFError) as e:
                    log.warning("cache: %s for %s failed (%s); reading the store instead",
                                cached.path, obj.ref.uri, e)  # fmt: skip
                    self.cache.remove(Cache.name(obj.ref, obj.etag))
                finally:
                    cached.close()
        threads, cache = d.config.io_threads, self.cache
        log.info("pinning %s from the store", obj.ref.uri)

        def read(buf: PoolBuffer, groups: Groups, done: s3fill.Progress) -> None:
            s3fill.fill(store, obj, buf.addr, groups, threads, done)
            if cache is not None:
                try:
                    cache.put(store, obj, buf.addr, threads)
                except (OSError, DaemonError) as e:  # a full cache disk: pinned, not cached
                    log.warning("cache: caching %s failed: %s", obj.ref.uri, e)

        async def explain(e: BaseException) -> None:
            if isinstance(e, ChecksumMismatch):
                d.tiers.mark_corrupt(entry, "pin_failed", e)

        async for end in d.tiers.fill(uid, entry, read, explain):
            yield end

    @staticmethod
    async def _nothing(e: BaseException) -> None:
        """A cached copy that fails says nothing about the object: the store is read next."""

    def _cached(self, ref: ObjectRef, etag: str, size: int, content_id: str) -> SnapshotFile | None:
        """The cached copy of this version of the object if it holds the registered manifest."""
        if self.cache is None or not etag:
            return None
        try:
            file = self.cache.open(ref, etag, size)
        except (SnapshotError, OSError) as e:
            log.warning("cache: the copy of %s is unusable (%s); removing it", ref.uri, e)
            self.cache.remove(Cache.name(ref, etag))
            return None
        if file is not None and file.snapshot.manifest.content_id != content_id:
            log.warning("cache: %s does not hold %s's manifest; removing it", file.path, ref.uri)
            file.close()
            self.cache.remove(Cache.name(ref, etag))
            return None
        return file

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
