"""Restore a model's tensors from a snapshot file."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from thaw import _native, datapath
from thaw.errors import RestoreIncomplete, ThawError
from thaw.fingerprint import Fingerprint, check
from thaw.format import Snapshot, TensorEntry, open_snapshot, payload_fd
from thaw.pieces import Digests, Piece

# Below this share of the payload in page cache, CUDA restores read with O_DIRECT: buffered
# reads of a cold file cost a second copy through the page cache and evict what is there.
WARM_THRESHOLD = 0.5
# Native threads per pipeline worker: 4 workers x 4 threads keep sixteen 4 MiB requests in
# flight; at 4 x 2 a cold O_DIRECT restore reached 89% of the disk's rate and a page-cache
# restore 24 GB/s on the H200 host.
IO_THREADS = 4


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What one restore or freeze moved, and how fast."""

    bytes: int
    seconds: float
    source: str

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def restore_file(
    target: Any,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    strict: bool = True,
    expect: Fingerprint | None = None,
    threads: int = datapath.DEFAULT_THREADS,
) -> TransferStats:
    """Restore `target` (a torch module, a state dict or (name, tensor) pairs) from `path`.

    Checks the fingerprint (when `expect` is given), names, dtypes and shapes before a byte is
    copied. Checksums are verified while reading unless `verify=False`. If reading fails after
    copying began, raises RestoreIncomplete: the model holds mixed weights and must not be used.
    """
    started = time.perf_counter()
    snapshot = open_snapshot(path)
    if expect is not None:
        check(expect, snapshot.fingerprint)
    bindings = datapath.bind(snapshot.tensors, datapath.model_tensors(target), strict=strict)
    try:
        copied, source = _restore(snapshot, bindings, verify, threads)
    except ThawError as e:
        raise RestoreIncomplete(
            f"restore from {snapshot.path} failed part way: {e} — the model now holds a mix of "
            "old and new weights; restore again or reload it before use"
        ) from e
    return TransferStats(copied, time.perf_counter() - started, source)


def _restore(
    snapshot: Snapshot, bindings: list[datapath.Binding], verify: bool, threads: int
) -> tuple[int, str]:
    cpu = [b for b in bindings if b.tensor.device.type == "cpu"]
    gpu = [b for b in bindings if b.tensor.device.type == "cuda"]
    copied = 0
    with payload_fd(snapshot, direct=False) as fd:
        resident = _native.resident_bytes(fd, snapshot.payload_offset, snapshot.payload_length)
        warm = resident >= WARM_THRESHOLD * snapshot.payload_length
        if cpu:
            # CPU tensors are not page aligned: buffered reads straight into their memory.
            copied += datapath.copy_to_cpu(
                cpu,
                lambda addr, e: _read(fd, snapshot, addr, e.offset, e.length, threads),
                _digests(snapshot, cpu, verify, threads),
            )
    if gpu:
        with payload_fd(snapshot, direct=not warm) as fd:

            def fill(addr: int, piece: Piece) -> None:
                _read(fd, snapshot, addr, piece.payload_offset, piece.length, IO_THREADS)

            hash_threads = max(1, threads // datapath.PIPELINE_WORKERS)
            copied += datapath.copy_to_cuda(
                gpu, fill, _digests(snapshot, gpu, verify, hash_threads)
            )
    return copied, "page cache" if warm else "disk"


def _digests(
    snapshot: Snapshot, bindings: list[datapath.Binding], verify: bool, threads: int
) -> Digests | None:
    return Digests([b.entry for b in bindings], snapshot.path, threads) if verify else None


def _read(fd: int, snapshot: Snapshot, addr: int, offset: int, length: int, threads: int) -> None:
    # 4 MiB per thread task: enough to keep several O_DIRECT requests in flight per piece.
    _native.pread_into(fd, addr, length, snapshot.payload_offset + offset, threads, 4 << 20)


def read_tensor(snapshot: Snapshot, entry: TensorEntry, verify: bool = True) -> Any:
    """One tensor of a snapshot as a new CPU tensor (for inspection and tools)."""
    import torch

    from thaw.dtypes import torch_dtype
    from thaw.format import verify_tensor

    out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    with payload_fd(snapshot, direct=False) as fd:
        _read(fd, snapshot, int(out.data_ptr()), entry.offset, entry.length, 1)
    if verify:
        verify_tensor(snapshot.path, entry, int(out.data_ptr()))
    return out
