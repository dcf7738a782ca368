"""Freeze sessions: thawd lays the snapshot out in its pool, the tensors are copied in (by a
daemon copy out of our GPU memory, or into the pool buffer mapped here), and the commit
checksums it and writes the file behind."""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from thaw import errors
from thaw._proto import thawd_pb2 as pb
from thaw.daemon.connection import Connection
from thaw.format import TensorEntry
from thaw.format.fingerprint import Fingerprint
from thaw.mem.mapping import Mapping as MemoryMapping

if TYPE_CHECKING:
    from thaw.daemon.records import SnapshotRecord

log = logging.getLogger("thaw.daemon")


def freeze(
    conn: Connection,
    model: Any,
    name: str,
    path: str | None = None,
    fingerprint: Fingerprint | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    pin: bool = True,
    wait: bool = False,
) -> SnapshotRecord:
    """Freeze `model`'s tensors into a new snapshot held by the daemon and written behind.

    Returns once the bytes are in the daemon's pool and checksummed (wait=True: once the
    file is durable). `path` defaults to the daemon's state directory. pin=False leaves it
    demotable once written.
    """
    import torch

    from thaw.copy import binding
    from thaw.format.dtypes import dtype_name

    named = binding.model_tensors(model)
    if fingerprint is None:
        fingerprint = (
            binding.describe(model) if isinstance(model, torch.nn.Module) else Fingerprint()
        )
    specs = [
        pb.TensorSpec(name=n, dtype=dtype_name(t.dtype), shape=list(t.shape)) for n, t in named
    ]
    cuda_only = bool(named) and all(t.device.type == "cuda" for _, t in named)
    held = conn.hold_pool()  # no background mapping beside the copy
    try:
        begin = _freeze_copy(conn, name, path, specs, fingerprint, labels, pin, named, cuda_only)
    finally:
        if held is not None:
            held.release()
    reply = conn.call(
        "CommitFreeze",
        pb.CommitFreezeRequest(session_id=begin.session_id, wait=wait),
        timeout=None if wait else conn.timeout,
    )
    from thaw.daemon.records import SnapshotRecord  # on first use: thaw.daemon.values says why

    return SnapshotRecord.from_pb(reply.snapshot)


def _freeze_copy(
    conn: Connection,
    name: str,
    path: str | None,
    specs: builtins.list[Any],
    fingerprint: Fingerprint,
    labels: Mapping[str, str] | None,
    pin: bool,
    named: Any,
    cuda_only: bool,
) -> pb.BeginFreezeResponse:
    """Open a freeze session and copy the tensors into it: by daemon copy for CUDA
    tensors on a VMM pool, else into the pool buffer mapped here. Returns the session."""
    from thaw.copy import binding

    # CUDA tensors: the daemon copies them into pool memory it mapped at start (CopyOut);
    # a process mapping a fresh pool buffer pays for it during the copy.
    for daemon_copy in (True, False) if cuda_only else (False,):
        t0 = time.perf_counter()
        begin = conn.call(
            "BeginFreeze",
            pb.BeginFreezeRequest(
                name=name,
                path=_where(path),
                tensors=specs,
                pin=pin,
                fingerprint_json=json.dumps(fingerprint.to_json()),
                labels=dict(labels or {}),
                daemon_copy=daemon_copy,
            ),
        )
        try:
            entries = [
                TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.length)
                for t in begin.tensors
            ]
            bindings = binding.bind(entries, named, strict=True)
            if daemon_copy and begin.pool_kind == pb.POOL_KIND_VMM:
                from thaw.copy.daemon_copy import batches_for_daemon

                t_begin = time.perf_counter()
                index = {t.name: i for i, t in enumerate(begin.tensors)}
                batches = batches_for_daemon(bindings, index, freeze=True)
                try:
                    first = next(batches, None)
                except errors.CudaError as e:  # e.g. expandable segments: map instead
                    log.info("freeze %s: no daemon copy (%s); mapping the pool", name, e)
                    conn.call("AbortFreeze", pb.AbortFreezeRequest(session_id=begin.session_id))
                    continue
                t_export = time.perf_counter()
                rest = itertools.chain([first] if first else [], batches)
                conn.daemon_copy("CopyOut", begin.session_id, rest)
                log.debug(
                    "freeze %s: begin %.1f ms, first export %.1f ms, daemon copy %.1f ms",
                    name,
                    (t_begin - t0) * 1e3,
                    (t_export - t_begin) * 1e3,
                    (time.perf_counter() - t_export) * 1e3,
                )
            else:
                _freeze_mapped(conn, name, begin, bindings)
        except BaseException:
            with contextlib.suppress(errors.DaemonError):
                conn.call("AbortFreeze", pb.AbortFreezeRequest(session_id=begin.session_id))
            raise
        break
    return begin


def _freeze_mapped(
    conn: Connection, name: str, begin: pb.BeginFreezeResponse, bindings: builtins.list[Any]
) -> None:
    """Copy the tensors into the freeze session's pool buffer, mapped here."""
    from thaw.copy import binding, datapath

    t0 = time.perf_counter()
    fds, sizes, _ = conn.redeem(begin.session_id)
    try:
        if begin.pool_kind == pb.POOL_KIND_VMM:
            from thaw.mem import vmm

            device = binding.cuda_device(bindings) or 0
            t_redeem = time.perf_counter()
            cuda_only = all(b.tensor.device.type == "cuda" for b in bindings)
            buf = vmm.HostBuffer.import_fds(
                fds, sizes, device, lazy=True, host_access=not cuda_only
            )
            t_map = time.perf_counter()
            try:
                datapath.copy_from_tensors(
                    bindings, buf.addr, gpu_accessible=True, ensure_mapped=buf.map_until
                )
            finally:
                buf.close()
            marks = (t0, t_redeem, t_map, time.perf_counter())
            ms = [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
            log.debug("freeze %s: redeem %.1f ms, map %.1f ms, copy %.1f ms", name, *ms)
        else:
            with MemoryMapping(fds[0], sizes[0], writable=True) as m:
                datapath.copy_from_tensors(bindings, m.addr)
    finally:
        for fd in fds:
            os.close(fd)


def _where(path: str | None) -> str:
    """A freeze's target as thawd takes it: an absolute path, an object URI (s3://bucket/key,
    written by thawd where its operator allows), or "" for thawd's own directory."""
    if not path:
        return ""
    return path if path.startswith("s3://") else os.path.abspath(path)
