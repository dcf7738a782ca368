"""Daemon copy: thawd copies between its pinned pool and a client's GPU memory, so the client
maps no shared memory at all (isolation between tenants, or a process that cannot import VMM
fds), and a freeze writes into pool memory the daemon mapped at start.

The client exports each cudaMalloc allocation holding its tensors over CUDA IPC (`export`);
thawd opens those handles on the GPU with the client's UUID and copies to or from its own
pinned pool (thawd/daemon_copy.py) at the link's speed (benchmarks/daemon.py; about 0.1 ms
per opened handle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from thaw.errors import CudaError, ModelMismatch
from thaw.mem import cuda

if TYPE_CHECKING:  # for annotations only: thaw.copy.binding imports torch
    from thaw.copy.binding import Binding


@dataclasses.dataclass(frozen=True)
class Export:
    """Where a restore's tensors live in the client's GPU memory, as the daemon needs it."""

    device_uuid: str
    regions: list[tuple[bytes, int]]  # (CUipcMemHandle bytes, allocation size)
    copies: list[tuple[int, int, int]]  # (snapshot tensor index, region index, offset in it)


def export(targets: Sequence[tuple[int, Any]], device: int) -> Export:
    """Export the allocations behind `targets` ((snapshot tensor index, CUDA tensor) pairs).

    A tensor is a slice of one cudaMalloc allocation (torch's caching allocator); the handle is
    that allocation's, the offset the tensor's place in it. Allocations made with
    `expandable_segments` (VMM) have no legacy IPC handle: CudaError says so."""
    cuda.set_device(device)
    bases: dict[int, int] = {}
    regions: list[tuple[bytes, int]] = []
    copies = []
    for index, tensor in targets:
        ptr = int(tensor.data_ptr())
        base, size = cuda.address_range(ptr)
        if base not in bases:
            try:
                handle = cuda.ipc_handle(base)
            except CudaError as e:
                raise CudaError(
                    f"{e}: CUDA IPC mode needs tensors in cudaMalloc memory; allocations from "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True cannot be exported"
                ) from e
            bases[base] = len(regions)
            regions.append((handle, size))
        copies.append((index, bases[base], ptr - base))
    return Export(cuda.device_uuid(device), regions, copies)


def batches_for_daemon(
    bindings: Sequence[Binding], index: Mapping[str, int], freeze: bool = False, count: int = 4
) -> Iterator[tuple[Any, Callable[[], int]]]:
    """`export_for_daemon` over `count` batches of about equal bytes, each exported only when
    the caller takes it: exporting an allocation costs ~0.4 ms the first time (H200 host), so
    a caller that sends each batch before exporting the next overlaps that with the copies."""
    total = sum(b.entry.length for b in bindings)
    batch: list[Binding] = []
    done, cut = 0, 1  # the next batch ends once `done` reaches cut/count of `total`
    for b in bindings:
        batch.append(b)
        done += b.entry.length
        if done * count >= total * cut:
            yield export_for_daemon(batch, index, freeze)
            batch, cut = [], done * count // max(total, 1) + 1
    if batch:
        yield export_for_daemon(batch, index, freeze)


def export_for_daemon(
    bindings: Sequence[Binding], index: Mapping[str, int], freeze: bool = False
) -> tuple[Any, Callable[[], int]]:
    """CUDA IPC mode, before any byte moves: export the allocations behind the bound CUDA
    tensors for thawd to copy into (`freeze`: to copy from). `index` maps a tensor name to its
    place in the daemon's tensor list. Returns (thaw.copy.daemon_copy.Export, `finish`): call
    `finish()` once the daemon has copied; it returns the bytes moved."""
    from thaw.copy.binding import cuda_device
    from thaw.copy.datapath import Targets

    device = cuda_device(bindings)
    if device is None or any(b.tensor.device.type != "cuda" for b in bindings):
        raise ModelMismatch(
            "CUDA IPC mode restores CUDA tensors only; CPU tensors need "
            "mode='auto' (they copy from pool memory or the file)"
        )
    # Non-contiguous tensors go through contiguous temporaries, alive until `finish`.
    targets = Targets(bindings, copy_in=freeze)
    cuda.set_device(device)
    cuda.device_synchronize()  # the tensors are final and idle before another process copies
    exported = export(
        [
            (index[b.entry.name], targets.tensors[i])
            for i, b in enumerate(bindings)
            if b.entry.length
        ],
        device,
    )

    def finish() -> int:
        if not freeze:
            targets.finish()
        return sum(b.entry.length for b in bindings)

    return exported, finish
