"""Restore sessions: open (one packet on the fd socket for a whole batch), check and copy each
into its tensors from what thawd delivers (its pool mapped here, a pool buffer's fds, the
registered file, or a daemon copy into our GPU memory), and close (confirmed or failed, one
packet). Pool buffers stay mapped for this process's next restore of the same buffer."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from thaw import errors
from thaw.daemon import fdsocket
from thaw.daemon.connection import Connection
from thaw.daemon.opened import Opened, as_json
from thaw.daemon.refusals import code_name, from_rpc, refused
from thaw.daemon.values import Delivery, PoolKind, RestoreResult
from thaw.format.fingerprint import Fingerprint, check
from thaw.mem.mapping import Mapping as MemoryMapping

# "daemon_copy": thawd copies into our CUDA tensors (proto daemon_copy, CopyInto); "ipc" is
# its older name, still accepted.
RESTORE_MODES = ("auto", "daemon_copy")
_MODE_ALIASES = {"ipc": "daemon_copy"}

log = logging.getLogger("thaw.daemon")


class Restores:
    """The restores of one client: its sessions and the pool buffers it keeps mapped."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._maps_lock = threading.Lock()
        self._mappings: dict[str, tuple[int, Any]] = {}  # name -> (buffer id, mapping)

    def restore(
        self,
        items: builtins.list[tuple[Any, str]],
        strict: bool,
        expect: Fingerprint | None,
        progress: Callable[[int, int], None] | None,
        mode: str | None,
    ) -> builtins.list[RestoreResult]:
        mode = mode or os.environ.get("THAW_RESTORE_MODE") or "auto"
        mode = _MODE_ALIASES.get(mode, mode)
        if mode not in RESTORE_MODES:
            raise errors.InvalidRequest(f"restore mode {mode!r}: use one of {RESTORE_MODES}")
        held = self._conn.hold_pool()
        try:
            return self._restore_held(items, strict, expect, progress, mode, held)
        finally:
            if held is not None:
                held.release()

    def _restore_held(
        self,
        items: builtins.list[tuple[Any, str]],
        strict: bool,
        expect: Fingerprint | None,
        progress: Callable[[int, int], None] | None,
        mode: str,
        held: Any,
    ) -> builtins.list[RestoreResult]:
        from thaw.copy import binding, datapath

        t0 = time.perf_counter()
        plans, requests = [], []
        for target, name in items:
            named = binding.model_tensors(target)
            cuda_only = bool(named) and all(t.device.type == "cuda" for _, t in named)
            if mode == "daemon_copy" and not cuda_only:
                raise errors.InvalidRequest(
                    "restore mode 'daemon_copy' copies into CUDA tensors "
                    "only; "
                    "use mode 'auto' for CPU tensors"
                )
            with self._maps_lock:
                cached = self._mappings.get(name)
            devices = {t.device.index or 0 for _, t in named}
            mirror = held if cuda_only and held is not None and devices == {held.device} else None
            plans.append((name, named, mirror))
            requests.append(
                {
                    "name": name,
                    "mapped_buffer": cached[0] if cached else 0,
                    "daemon_copy": mode == "daemon_copy",
                    "can_daemon_copy": cuda_only,
                    "pool_id": mirror.id if mirror else 0,
                }
            )
        _wake_link(plans)
        infos = self.open_many(requests)
        t_open = time.perf_counter()
        closes: builtins.list[dict[str, Any]] = []
        results = []
        # A batch leaves each snapshot's GPU copies in flight and waits once, at the end: no
        # idle link between one snapshot's copies and the next one's.
        in_flight = len(items) > 1
        devices = {
            t.device.index or 0
            for _, named, _ in plans
            for _, t in named
            if t.device.type == "cuda"
        }
        try:
            for (name, named, mirror), info in zip(plans, infos, strict=True):
                started = time.perf_counter()
                copied, delivery = self.copy_session(
                    name, info, named, strict, expect, progress, in_flight, mirror
                )
                seconds = time.perf_counter() - started
                closes.append(_close(info.session_id, copied, seconds))
                results.append(
                    RestoreResult(name, info.tier, copied, seconds, delivery, _content_id(info))
                )
            for device in devices if in_flight else ():
                datapath.finish_copies(device)
        except BaseException as e:
            for device in devices if in_flight else ():
                with contextlib.suppress(errors.ThawError):
                    datapath.finish_copies(device)
            failure = f"{type(e).__name__}: {e}"[:1000]
            done = {c["id"] for c in closes}
            closes += [
                _close(i.session_id, error=failure) for i in infos if i.session_id not in done
            ]
            with contextlib.suppress(errors.DaemonError):  # the original error says more
                self.close_sessions(closes)
            if len(items) > 1:
                restored = ", ".join(repr(r.name) for r in results) or "none"
                errors.add_note(e, f"restored and confirmed before it: {restored}; the rest "
                                "are not")  # fmt: skip
            raise
        t_copy = time.perf_counter()
        try:
            self.close_sessions(closes)
        except errors.DaemonError as e:
            names = ", ".join(repr(r.name) for r in results)
            raise errors.DaemonUnavailable(
                f"thawd went away during the restore of {names} ({e}); the restore is not "
                "confirmed: restore again (or reload the model) before serving"
            ) from e
        seconds = time.perf_counter() - t0
        total = sum(r.bytes for r in results)
        log.debug(
            "restore %s: open %.1f ms, copy %.1f ms (%.2f GB/s), close %.1f ms",
            ", ".join(r.name for r in results),
            (t_open - t0) * 1e3,
            (t_copy - t_open) * 1e3,
            total / max(t_copy - t_open, 1e-9) / 1e9,
            (seconds - (t_copy - t0)) * 1e3,
        )
        if len(results) == 1:  # the whole call, control path included
            results[0] = dataclasses.replace(results[0], seconds=seconds)
        return results

    def open_many(self, requests: builtins.list[dict[str, Any]]) -> builtins.list[Opened]:
        """Open a restore session for each request: in one packet on the fd socket (a tenth of
        a gRPC call's latency), or, where their manifests do not fit one, with OpenRestore
        calls all in flight at once. On any failure no session stays open and the first
        error is raised."""
        if len(requests) <= fdsocket.MAX_OPENS and self._conn.opens_json:
            reply = self._conn.fd_request(
                {"op": "open", "restores": requests},
                "while opening a restore",
                reconnect=True,
            )
            if reply.get("ok"):
                return [Opened(o) for o in reply["opened"]]
            if reply.get("error") != fdsocket.TOO_LARGE:
                raise refused(reply)
        # Over gRPC (manifests too large for one packet): protobuf is imported only here.
        from thaw._proto import thawd_pb2 as pb

        messages = [pb.OpenRestoreRequest(**r) for r in requests]
        if len(messages) == 1:
            return [Opened(as_json(self._conn.call("OpenRestore", messages[0])))]
        for attempt in (0, 1):
            opened, failures = self._conn.in_flight("OpenRestore", messages)
            infos = [Opened(as_json(o)) for o in opened]
            if not failures:
                return infos
            why = "not restored: another of the batch failed to open"
            with contextlib.suppress(errors.DaemonError):
                self.close_sessions([_close(i.session_id, error=why) for i in infos])
            if attempt == 0 and not infos and code_name(failures[0]) == "UNAUTHENTICATED":
                self._conn.authenticate()  # the daemon restarted and forgot our token
                continue
            raise from_rpc(failures[0], self._conn.socket) from None
        raise AssertionError("unreachable")

    def close_sessions(self, closes: builtins.list[dict[str, Any]]) -> None:
        """End restore sessions, confirming or failing each, on the fd socket: one packet
        for a whole batch, at a tenth of a gRPC call's latency (every restore waits for its
        confirmation). Raises the daemon's first refusal, DaemonUnavailable if it is gone."""
        for at in range(0, len(closes), fdsocket.MAX_CLOSES):
            sessions = closes[at : at + fdsocket.MAX_CLOSES]
            reply = self._conn.fd_request(
                {"op": "close", "sessions": sessions}, "while confirming a restore"
            )
            if not reply.get("ok"):
                raise refused(reply)

    def copy_session(
        self,
        name: str,
        info: Opened,
        named: Any,
        strict: bool,
        expect: Fingerprint | None,
        progress: Callable[[int, int], None] | None,
        in_flight: bool = False,
        mirror: Any = None,
    ) -> tuple[int, Delivery]:
        """Check and copy one opened restore into its tensors; returns (bytes copied, how they
        came: RestoreResult.delivery).
        `in_flight`: direct GPU copies may still run on return (datapath.finish_copies).
        `mirror`: our map of the whole pool, when the request offered it."""
        from thaw.copy import binding, datapath

        total = sum(t.length for t in info.tensors)
        if expect is not None:
            check(expect, Fingerprint.from_json(json.loads(info.fingerprint_json)))
        bindings = binding.bind(list(info.tensors), named, strict=strict)
        if info.pool_kind == PoolKind.FILE:
            return self._copy_file(name, info, bindings, total, progress), Delivery.FILE
        source = (
            None
            if info.delivery == Delivery.DAEMON_COPY
            else self._map(name, info, bindings, mirror)
        )
        if source is None:  # the daemon copies: export our allocations to it
            from thaw.copy.daemon_copy import batches_for_daemon

            index = {t.name: i for i, t in enumerate(info.tensors)}
            batches = batches_for_daemon(bindings, index)
            first = next(batches, None)  # a refusal here is before any byte moved
        if progress is not None:
            progress(0, total)
        try:
            if source is None:
                rest = itertools.chain([first] if first else [], batches)
                copied = self._conn.daemon_copy("CopyInto", info.session_id, rest)
            else:
                base, gpu_accessible, ensure_mapped, release = source
                try:
                    copied = datapath.copy_to_tensors(
                        bindings,
                        base,
                        gpu_accessible=gpu_accessible,
                        path=f"thawd:{name}",
                        ensure_mapped=ensure_mapped,
                        in_flight=in_flight,
                    )
                finally:
                    release()
        except errors.ThawError as e:
            raise errors.RestoreIncomplete(
                f"restore of {name!r} failed part way: {e}; the model holds mixed "
                "weights: restore again or reload it before use"
            ) from e
        if progress is not None:
            progress(copied, total)
        if source is None:
            return copied, Delivery.DAEMON_COPY
        return copied, info.delivery

    def _copy_file(
        self,
        name: str,
        info: Opened,
        bindings: builtins.list[Any],
        total: int,
        progress: Callable[[int, int], None] | None,
    ) -> int:
        """A snapshot that is not pinned: thawd hands over the registered file's fd, which is
        read with pread and verified against the manifest thawd registered, tensor by tensor,
        as the bytes land (the file is the one part of the path thawd does not hold)."""
        from thaw.copy import restore

        fds, _, _ = self._conn.redeem(info.session_id)
        if progress is not None:
            progress(0, total)
        try:
            copied, _ = restore.read_payload(
                bindings,
                fds[0],
                info.payload_offset,
                info.payload_length,
                f"{info.path} (thawd:{name})",
            )
        finally:
            for fd in fds:
                os.close(fd)
        if progress is not None:
            progress(copied, total)
        return copied

    def _map(
        self,
        name: str,
        info: Opened,
        bindings: builtins.list[Any],
        mirror: Any = None,
    ) -> _Source | None:
        """Map what the session delivers: (payload address, whether CUDA can DMA from it, for
        a pool buffer still being mapped the function that maps it up to a payload offset, and
        the function to call after the copy). None: this process cannot import the pool
        memory, a daemon copy must do."""
        from thaw.copy import binding

        cuda = binding.cuda_device(bindings) is not None
        cuda_only = all(b.tensor.device.type == "cuda" for b in bindings)
        if info.delivery == Delivery.POOL:
            return _from_pool(name, info, mirror)
        kind = info.pool_kind
        if info.delivery == Delivery.MAPPED:
            with self._maps_lock:
                cached = self._mappings.get(name)
            if cached is None or cached[0] != info.buffer_id:
                # Forgotten by another thread since we asked: the daemon copies instead.
                if kind == PoolKind.VMM and cuda_only:
                    return None
                raise errors.DaemonError(
                    f"the mapping of {name!r} was dropped during the restore; restore again"
                )
            return self._use(cached[1], kind, cuda, cuda_only, info.pool_size)
        t0 = time.perf_counter()
        fds, sizes, buffer_id = self._conn.redeem(info.session_id)
        t_redeem = time.perf_counter()
        try:
            # Pool buffers stay mapped (and CUDA-registered) for this process's next restore
            # of the same buffer: mapping and registration are paid once per process.
            if kind == PoolKind.VMM:
                from thaw.mem import vmm

                device = binding.cuda_device(bindings) or 0
                # Lazy: the copy imports and maps chunk by chunk, overlapping it with DMA.
                holder: Any = vmm.HostBuffer.import_fds(
                    fds, sizes, device, lazy=True, host_access=not cuda_only
                )
                t_import = time.perf_counter()
                try:
                    holder.map_until(1)  # the first chunk: proves this process can import
                    log.debug(
                        "pool %s: redeem %.1f ms, import %.1f ms, first chunk %.1f ms",
                        name,
                        (t_redeem - t0) * 1e3,
                        (t_import - t_redeem) * 1e3,
                        (time.perf_counter() - t_import) * 1e3,
                    )
                except errors.CudaError as e:
                    holder.close()
                    if not cuda_only:
                        raise
                    log.warning("cannot import thawd's pool memory (%s): daemon copy", e)
                    return None
            else:
                holder = MemoryMapping(fds[0], sizes[0], populate=True)
            with self._maps_lock:
                self._replace(name, (buffer_id, holder))
            register = sizes[0] if kind == PoolKind.MEMFD else 0
            return self._use(holder, kind, cuda, cuda_only, register)
        finally:
            for fd in fds:
                os.close(fd)

    def _replace(self, name: str, cached: tuple[int, Any]) -> None:
        """Cache `name`'s mapping, closing the one it replaces (call with _maps_lock held)."""
        old = self._mappings.get(name)
        if old is not None and old[1] is not cached[1]:
            _close_mapping(old[1])
        self._mappings[name] = cached

    @staticmethod
    def _use(holder: Any, kind: PoolKind, cuda: bool, cuda_only: bool, register: int) -> _Source:
        if kind == PoolKind.VMM and not cuda_only:
            holder.enable_host_access()
        if kind == PoolKind.MEMFD and cuda:
            from thaw.mem import cuda as cuda_mod

            cuda_mod.register_host(holder.addr, register, read_only=True)
        ensure = holder.map_until if kind == PoolKind.VMM and holder.mapped < holder.size else None
        return holder.addr, kind == PoolKind.VMM or cuda, ensure, _nothing

    def forget(self, name: str) -> None:
        """Drop this process's cached mapping of `name`'s pool buffer (if any)."""
        with self._maps_lock:
            cached = self._mappings.pop(name, None)
        if cached is not None:
            _close_mapping(cached[1])

    def close(self) -> None:
        """Unmap every pool buffer still mapped."""
        with self._maps_lock:
            mappings, self._mappings = list(self._mappings.values()), {}
        for _, holder in mappings:
            _close_mapping(holder)


# What a restore copies from: (payload address, whether CUDA can DMA from it, the function
# that maps a lazily mapped pool buffer up to a payload offset, the function to call after).
_Source = tuple[int, bool, Callable[[int], None] | None, Callable[[], None]]


def _nothing() -> None:
    pass


def _content_id(info: Opened) -> str:
    """The restored payload's content id, from the manifest thawd sent."""
    from thaw.format import Manifest

    return Manifest(Fingerprint(), info.tensors).content_id


def _close(
    session_id: str, copied: int = 0, seconds: float = 0.0, error: str = ""
) -> dict[str, Any]:
    """A restore session's end as the fd socket's "close" takes it: confirmed (no `error`)
    with what it copied, or failed."""
    return {"id": session_id, "ok": not error, "bytes": copied, "seconds": seconds, "error": error}


def _from_pool(name: str, info: Opened, mirror: Any) -> _Source:
    """DELIVERY_POOL: the buffer lies at info.pool_offset in our map of thawd's whole pool
    (the vmm.PoolMirror whose id the request carried, held by this restore)."""
    if mirror is None:  # the daemon answered a pool id this request did not carry
        raise errors.DaemonError(f"restore of {name!r}: DELIVERY_POOL without a pool map")
    start = info.pool_offset
    return mirror.addr + start, True, mirror.mapper(start), _nothing


def _wake_link(plans: builtins.list[tuple[str, Any, Any]]) -> None:
    """A restore from our map of thawd's pool wakes its GPU's link while thawd answers the
    open (datapath.wake_link): what to copy is known only from the reply."""
    from thaw.copy import datapath

    mirror = next((m for _, _, m in plans if m is not None), None)
    if mirror is None:
        return
    source = mirror.mapped_address()
    if source is not None:  # never past the chunk's end: nothing may be mapped there
        datapath.wake_link(mirror.device, source, mirror.chunk)


def _close_mapping(holder: Any) -> None:
    cuda_mod = sys.modules.get("thaw.mem.cuda")  # only a process that registered imported it
    if cuda_mod is not None and isinstance(holder, MemoryMapping) and holder.addr:
        cuda_mod.unregister_host(holder.addr)
    holder.close()
