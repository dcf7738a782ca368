"""Restore a model's tensors from a snapshot file."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from thaw import _native
from thaw.copy import binding, datapath
from thaw.errors import RestoreIncomplete, SnapshotError, ThawError
from thaw.format import Snapshot, TensorEntry, payload_fd, read_snapshot
from thaw.format.checksum import Digests
from thaw.format.fingerprint import Fingerprint, check
from thaw.format.residency import resident_estimate

# Below this share of the payload in page cache, CUDA restores read with O_DIRECT: buffered
# reads of a cold file cost a second copy through the page cache and evict what is there.
WARM_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What one restore or freeze moved, and how fast."""

    bytes: int
    seconds: float
    source: str
    content_id: str = ""  # the snapshot's (thaw.format.Manifest.content_id)

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
    The file is opened once: its manifest and its payload come from the same open file.
    """
    started = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(path, f"cannot open: {e.strerror}") from e
    try:
        snapshot = read_snapshot(fd, path)
        if expect is not None:
            check(expect, snapshot.fingerprint)
        bindings = binding.bind(snapshot.tensors, binding.model_tensors(target), strict=strict)
        copied, source = read_payload(bindings, fd, snapshot.payload_offset,
                                      snapshot.payload_length, snapshot.path, verify=verify,
                                      threads=threads)  # fmt: skip
    finally:
        os.close(fd)
    return TransferStats(copied, time.perf_counter() - started, source,
                         snapshot.manifest.content_id)  # fmt: skip


def read_payload(
    bindings: list[binding.Binding],
    fd: int,
    payload_offset: int,
    payload_length: int,
    path: object,
    *,
    verify: bool = True,
    threads: int = datapath.DEFAULT_THREADS,
) -> tuple[int, str]:
    """Restore bound tensors from the snapshot open as `fd` (the payload at `payload_offset`),
    reading with pread, never through a mapping: a file truncated meanwhile is an error, not
    a SIGBUS. With `verify`, every tensor is checked against its checksum as it lands (in the
    tensor's own memory or a private staging slot, never in the file's pages). Returns (bytes
    copied, "page cache" or "disk"); RestoreIncomplete once bytes were copied."""
    try:
        return _restore(bindings, fd, payload_offset, payload_length, path, verify, threads)
    except (ThawError, EOFError, OSError) as e:
        raise RestoreIncomplete(
            f"restore from {path} failed part way: {e} — the model now holds a mix of "
            "old and new weights; restore again or reload it before use"
        ) from e


def _restore(
    bindings: list[binding.Binding], fd: int, payload_offset: int, payload_length: int,
    path: object, verify: bool, threads: int,
) -> tuple[int, str]:  # fmt: skip
    cpu = [b for b in bindings if b.tensor.device.type == "cpu"]
    gpu = [b for b in bindings if b.tensor.device.type == "cuda"]
    copied = 0
    resident = resident_estimate(fd, payload_offset, payload_length)
    warm = resident >= WARM_THRESHOLD * payload_length
    if cpu:
        # CPU tensors are not page aligned: buffered reads straight into their memory, each
        # 16 MiB block hashed as it lands (one pool of threads for all of them).
        offsets = [payload_offset + b.entry.offset for b in cpu]
        lengths = [b.entry.length for b in cpu]

        def fill_cpu(addrs: list[int]) -> list[bytes] | None:
            if verify:
                return _native.pread_hashed(fd, addrs, offsets, lengths, threads)
            for addr, offset, length in zip(addrs, offsets, lengths, strict=True):
                _native.pread_into(fd, addr, length, offset, threads, 4 << 20)
            return None

        copied += datapath.copy_to_cpu(cpu, fill_cpu, _digests(path, cpu, verify, threads))
    if gpu:
        direct = fd if warm else _direct(fd)
        align = 4096 if direct != fd else 0
        try:
            copied += datapath.read_to_cuda(gpu, direct, payload_offset, align,
                                            _digests(path, gpu, verify, 1), threads)  # fmt: skip
        finally:
            if direct != fd:
                os.close(direct)
    return copied, "page cache" if warm else "disk"


def _direct(fd: int) -> int:
    """The same file with O_DIRECT (a new open file description through /proc/self/fd, not
    its name), or `fd` itself where the filesystem refuses O_DIRECT."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return fd


def _digests(
    path: object, bindings: list[binding.Binding], verify: bool, threads: int
) -> Digests | None:
    return Digests([b.entry for b in bindings], path, threads) if verify else None


def read_tensor(snapshot: Snapshot, entry: TensorEntry, verify: bool = True) -> Any:
    """One tensor of a snapshot as a new CPU tensor (for inspection and tools)."""
    import torch

    from thaw.format.checksum import verify_tensor
    from thaw.format.dtypes import torch_dtype

    out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    with payload_fd(snapshot, direct=False) as fd:
        offset = snapshot.payload_offset + entry.offset
        _native.pread_into(fd, int(out.data_ptr()), entry.length, offset, 1, 4 << 20)
    if verify:
        verify_tensor(snapshot.path, entry, int(out.data_ptr()))
    return out
