"""Freeze a model's tensors into a snapshot file."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from thaw import _native, datapath
from thaw.dtypes import dtype_name
from thaw.fingerprint import Fingerprint
from thaw.format import PAYLOAD_OFFSET, SnapshotWriter, layout
from thaw.pieces import Digests, Piece
from thaw.restore import IO_THREADS, TransferStats


def freeze_file(
    source: Any,
    path: str | os.PathLike[str],
    *,
    fingerprint: Fingerprint | None = None,
    threads: int = datapath.DEFAULT_THREADS,
) -> TransferStats:
    """Write the tensors of `source` (module, state dict or pairs) to a new snapshot at `path`.

    Crash-safe: the snapshot appears at `path` complete or not at all. CUDA tensors are copied
    device-to-host through pinned staging on two streams while earlier slots are hashed and
    written with O_DIRECT.
    """
    started = time.perf_counter()
    named = datapath.model_tensors(source)
    if fingerprint is None:
        fingerprint = datapath.describe(source)
    entries = layout([(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in named])
    bindings = [datapath.Binding(e, t) for e, (_, t) in zip(entries, named, strict=True)]
    checksums = [0] * len(entries)
    lock = threading.Lock()
    with SnapshotWriter(path, entries) as writer:
        for i, b in enumerate(bindings):
            if b.tensor.device.type != "cuda":
                src = b.tensor.contiguous()
                addr = int(src.data_ptr())
                writer.write_at(b.entry.offset, addr, b.entry.length, threads)
                checksums[i] = _native.tree_hash(addr, b.entry.length, threads)
        gpu = [i for i, b in enumerate(bindings) if b.tensor.device.type == "cuda"]
        if gpu:
            gpu_bindings = [bindings[i] for i in gpu]
            hash_threads = max(1, threads // datapath.PIPELINE_WORKERS)
            digests = Digests([b.entry for b in gpu_bindings], path, hash_threads)
            fd = writer.direct_fd if writer.direct_fd >= 0 else writer.fd

            def drain(addr: int, piece: Piece) -> None:
                for seg in piece.segments:
                    found = digests.add(seg, addr + seg.piece_offset)
                    if found is not None:
                        with lock:
                            checksums[gpu[seg.index]] = found
                _native.pwrite_from(
                    fd,
                    addr,
                    piece.length,
                    PAYLOAD_OFFSET + piece.payload_offset,
                    IO_THREADS,
                    4 << 20,
                )

            datapath.copy_from_cuda(gpu_bindings, drain)
        writer.commit(fingerprint, checksums)
    size = sum(e.length for e in entries)
    return TransferStats(size, time.perf_counter() - started, "memory")
