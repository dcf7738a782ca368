"""The daemon's domain: the registered snapshots, who may change them, and the daemon's life.

Every method runs on the event loop thread (no locks); anything that blocks (opening and
reading files, checksums, writing snapshots) runs on worker threads and its result is applied
back on the loop. The servicers call exactly one method per RPC, here or in one of the parts
this object holds, each in its own module:

    tiers     pin, warm, unpin, verify            (thawd/tiers.py)
    restores  restore sessions and their memory   (thawd/restores.py)
    freezes   freeze sessions and written files   (thawd/freezes.py)

Errors are thaw.errors; the servicers map them to status codes.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from thaw._proto import thawd_pb2 as pb
from thaw.errors import (
    AlreadyExists,
    DaemonError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    SnapshotChanged,
    SnapshotError,
)
from thawd import paths
from thawd.budgets import Budgets
from thawd.buffers import VmmArena
from thawd.config import Config
from thawd.entries import POOL_KINDS, Entry
from thawd.events import Events
from thawd.files import SnapshotFile
from thawd.freezes import Freezes
from thawd.objects import Objects
from thawd.registry import Registry, new_row
from thawd.restores import Restores, Session
from thawd.s3.config import is_uri
from thawd.security import Peer, resolve_group, validate_labels, validate_name
from thawd.tiers import Tiers

log = logging.getLogger("thawd.state")
T = TypeVar("T")

# Manifests parsed at once (register, start): each parse of a large manifest holds hundreds of
# MB of Python objects for a moment; two at a time bound that whatever clients send.
PARSES = 2
# Blocking work a client causes (opening its paths, checking and reading its files) runs on
# worker threads, and a client whose filesystem hangs (a FUSE mount of its own, a dead NFS
# server) holds the threads it got. At most this many per uid at once: one user's hung mount
# cannot take the threads every other client needs (server.py sizes the pool at 64).
IO_PER_UID = 4


class Daemon:
    def __init__(self, config: Config, pool_kind: str, events: Events, gpus: list[pb.Gpu]) -> None:
        self.config = config
        self.pool_kind = pool_kind
        self.events = events
        self.gpus = gpus
        self.started = time.time()
        self.registry = Registry(config.registry_path)
        self.entries: dict[str, Entry] = {}
        self.sessions: dict[str, Session] = {}  # restore and freeze sessions, by id
        self.memory_locked = True
        self.parses = asyncio.Semaphore(PARSES)
        self._admin: tuple[str | None, frozenset[int]] = (None, frozenset())
        self._io: dict[int, asyncio.Semaphore] = {}
        # VMM: the whole pinned budget is created now, at start (see VmmArena).
        self.arena = (
            VmmArena(config.pinned_budget, config.vmm_chunk) if pool_kind == "vmm" else None
        )
        self.copier: Any = None  # CUDA IPC copies into clients' GPUs (VMM pool only)
        if pool_kind == "vmm":
            from thawd.daemon_copy import Copier

            self.copier = Copier()
        self.budgets = Budgets(
            lambda: (self.config.pinned_budget, self.config.warm_budget),
            self.entries.values(),
            lambda: sum(s.buffer.size for s in self.sessions.values() if s.buffer is not None),
            self.arena,
            lambda e, why: self.events.publish("demoted", e.row.name, why),
        )
        self.tiers = Tiers(self)
        self.restores = Restores(self)
        self.freezes = Freezes(self)
        self.objects = Objects(self)

    async def load(self) -> None:
        """Take up the registry: reopen each snapshot's file and check it is still the one
        registered; forget rows of freezes a killed daemon never finished writing."""
        await asyncio.to_thread(self.freezes.remove_stale_temporaries)
        objects: builtins.list[Entry] = []
        for row in await asyncio.to_thread(self.registry.rows):
            if row.state == "writing":
                log.warning(
                    "snapshot %s: thawd stopped while writing %s; its bytes were only "
                    "in memory, so it is gone (the name is free again)",
                    row.name,
                    row.path,
                )
                self.registry.remove(row.name)
                continue
            entry = Entry(row)
            if is_uri(row.path):
                objects.append(entry)
                self.entries[row.name] = entry
                continue
            try:
                async with self.parses:
                    file = await asyncio.to_thread(SnapshotFile.reopen, row.path, entry.identity())
                entry.attach(file)
                await asyncio.to_thread(entry.prepare)
            except (SnapshotError, DaemonError, OSError) as e:
                entry.row.error = str(e)
                log.warning("registered snapshot %s is unusable: %s", row.name, e)
            self.entries[row.name] = entry
            self.registry.save(entry.row)
        # Objects at once: each may wait on the store (bounded attempts), and a store that is
        # down must not cost the start that wait once per object, in turn.
        await asyncio.gather(*(self._load_object(e) for e in objects))

    async def _load_object(self, entry: Entry) -> None:
        try:
            await self.objects.load(entry)
        except (SnapshotError, DaemonError, OSError) as e:
            entry.row.error = str(e)
            log.warning("registered snapshot %s is unusable: %s", entry.row.name, e)
        self.registry.save(entry.row)

    # --- records ----------------------------------------------------------------------------

    def status(self) -> pb.DaemonStatus:
        from thawd import API_VERSION, __version__
        from thawd.hostinfo import host_memory

        total, available = host_memory()
        return pb.DaemonStatus(
            version=__version__,
            api_version=API_VERSION,
            pid=os.getpid(),
            started_unix=self.started,
            uptime_s=time.time() - self.started,
            pool_kind=POOL_KINDS[self.pool_kind],
            pinned_budget=self.config.pinned_budget,
            pinned_used=self.budgets.used("pinned"),
            warm_budget=self.config.warm_budget,
            warm_used=self.budgets.used("warm"),
            host_memory_total=total,
            host_memory_available=available,
            gpus=self.gpus,
            snapshots=len(self.entries),
            active_restores=sum(s.kind == "restore" for s in self.sessions.values()),
            active_freezes=sum(s.kind == "freeze" for s in self.sessions.values()),
            restores_total=self.restores.total,
            bytes_restored_total=self.restores.bytes_total,
            memory_locked=self.memory_locked,
            socket=self.config.socket,
            share_pool=self.config.share_pool,
            registry_unsaved=self.registry.unsaved,
            registry_error=self.registry.failing,
        )

    def pinned_used(self) -> int:
        return self.budgets.used("pinned")

    def warm_used(self) -> int:
        return self.budgets.used("warm")

    def list(self) -> builtins.list[pb.Snapshot]:
        return [e.record() for e in self.entries.values()]

    def stat(self, name: str) -> pb.Snapshot:
        return self.get(name).record()

    def get(self, name: str) -> Entry:
        try:
            return self.entries[validate_name(name)]
        except KeyError:
            raise NotFound(f"no snapshot named {name!r} is registered (see `thawctl ls`)") from None

    def owned(self, peer: Peer, name: str, action: str) -> Entry:
        """The entry `name`, if `peer` may `action` it: its owner, root, thawd's own uid, or a
        member of the configured admin group. Everyone allowed may list and restore."""
        entry = self.get(name)
        if peer.uid in (entry.row.owner_uid, 0, os.getuid()) or peer.groups & self.admin_gids:
            return entry
        raise PermissionDenied(
            f"uid {peer.uid} may not {action} {name!r}: it belongs to uid {entry.row.owner_uid} "
            "(its owner, root or a member of thawd's admin_group may)"
        )

    @property
    def admin_gids(self) -> frozenset[int]:
        """The admin group's gid, resolved once per configured value (a group name is an NSS
        lookup, which may go to the network: not on every request)."""
        group = self.config.admin_group
        if self._admin[0] != group:
            try:
                gids = frozenset({resolve_group(group, "admin_group")}) if group else frozenset()
            except InvalidRequest as e:
                log.error("%s: nobody is an admin", e)
                gids = frozenset()
            self._admin = (group, gids)
        return self._admin[1]

    async def on_thread(self, uid: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, as one of `uid`'s IO_PER_UID at most."""
        slot = self._io.setdefault(uid, asyncio.Semaphore(IO_PER_UID))
        async with slot:
            return await asyncio.to_thread(fn, *args)

    def save(self, entry: Entry) -> asyncio.Future[bool]:
        """Queue the entry's row for the registry (never raises; see thawd/registry.py)."""
        return self.registry.save(entry.row)

    # --- registering ------------------------------------------------------------------------

    async def register(
        self, peer: Peer, path: str, name: str, labels: dict[str, str]
    ) -> pb.Snapshot:
        """Open `path` as `peer` could (thawd/paths.py), read its manifest from that fd and
        register it under `name`: from now on the snapshot is that open file."""
        if name:
            validate_name(name)
        validate_labels(labels)
        if is_uri(path):
            return await self.objects.register(peer, path, name, labels)
        opened = await self.on_thread(peer.uid, paths.open_file, peer, path)
        async with self.parses:
            file = await self.on_thread(peer.uid, SnapshotFile.adopt, opened.fd, opened.path)
        try:
            name = name or validate_name(os.path.basename(opened.path).removesuffix(".thaw"))
            entry = Entry(new_row(name, file.path, labels, peer.uid))
            entry.attach(file)
            await self.on_thread(peer.uid, entry.prepare)
            self.claim(peer, name, entry)
        except BaseException:
            file.close()
            raise
        await self.save(entry)
        self.events.publish("registered", name, file.path, entry.payload_length)
        return entry.record()

    def claim(self, peer: Peer, name: str, entry: Entry) -> None:
        """Register `entry` as `name`: taken in one step (no await), unless the name is in
        use; a registration whose file changed or vanished is replaced by its owner."""
        old = self.entries.get(name)
        freezing = any(s.kind == "freeze" and s.name == name for s in self.sessions.values())
        held = old is not None and (old.file or old.object or old.file_pending)
        if freezing or held:
            where = f" ({old.row.path})" if old else " (being frozen)"
            raise AlreadyExists(f"a snapshot named {name!r} is already registered{where}")
        if old is not None:
            self.owned(peer, name, "replace")
            old.check_idle()
            old.close()
            del self.entries[name]
        self.entries[name] = entry

    async def unregister(self, peer: Peer, name: str) -> None:
        entry = self.owned(peer, name, "unregister")
        entry.check_idle()
        entry.close()
        del self.entries[name]
        await self.registry.remove(name)
        self.events.publish("unregistered", name)

    async def check_file(self, uid: int, entry: Entry, file: SnapshotFile) -> None:
        """SnapshotChanged (and the entry marked so) if its file changed since registered.
        On one of `uid`'s threads: a stat by name may wait on a slow filesystem."""
        try:
            await self.on_thread(uid, file.check)
        except SnapshotChanged as e:
            self.changed(entry, e)
            raise

    def changed(self, entry: Entry, error: SnapshotChanged) -> None:
        """The entry's file changed: stop serving it from the file, say so once."""
        entry.drop_file(str(error))
        self.save(entry)
        self.events.publish("snapshot_changed", entry.row.name, str(error))
        log.warning("%s", error)

    # --- start and stop ---------------------------------------------------------------------

    async def repin(self, on_progress: Any) -> None:
        thawd_itself = Peer(os.getpid(), os.getuid(), os.getgid(), frozenset())
        wanted = [e for e in self.entries.values()
                  if e.row.wanted_tier != "cold" and (e.file or e.object)]  # fmt: skip
        for i, entry in enumerate(wanted):
            on_progress(f"re-pinning {entry.row.name} ({i + 1}/{len(wanted)})")
            try:
                async for _ in self.tiers.pin(thawd_itself, entry.row.name, entry.row.wanted_tier):
                    pass
            except Exception as e:
                entry.row.error = str(e)
                log.error("re-pinning %s failed: %s", entry.row.name, e)

    async def drain(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while (self.sessions or self.freezes.writing) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.freezes.writing:
            log.warning("waiting for %d snapshot writes to finish", len(self.freezes.writing))
            await asyncio.gather(*self.freezes.writing, return_exceptions=True)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self.restores.end(session)
        for entry in self.entries.values():
            entry.close()
        if self.copier is not None:
            self.copier.close()
        if self.arena is not None:
            self.arena.close()
        self.objects.close()
        self.restores.flush_counters()
        self.registry.close()
