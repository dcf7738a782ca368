"""Daemon copy: thawd copies between its pinned pool and a client's GPU memory, so the client
maps no shared memory at all (isolation between tenants, or a process that cannot import VMM
fds), and a freeze writes into pool memory the daemon mapped at start.

The client exports each cudaMalloc allocation holding its tensors over CUDA IPC (`export`);
thawd opens those handles on the GPU with the client's UUID and copies to or from its own
pinned pool (thawd/daemon_copy.py) at the link's speed (benchmarks/daemon.py; about 0.1 ms
per opened handle).
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from typing import Any

from cuda.bindings import driver as cu
from cuda.bindings import runtime as cudart

from thaw.errors import CudaError
from thaw.mem import cuda

HANDLE_BYTES = 64


@dataclasses.dataclass(frozen=True)
class Export:
    """Where a restore's tensors live in the client's GPU memory, as the daemon needs it."""

    device_uuid: str
    regions: list[tuple[bytes, int]]  # (cudaIpcMemHandle_t bytes, allocation size)
    copies: list[tuple[int, int, int]]  # (snapshot tensor index, region index, offset in it)


def device_uuid(device: int) -> str:
    """The GPU's UUID as nvidia-smi prints it ("GPU-xxxxxxxx-..."): the same in every process,
    whatever CUDA_VISIBLE_DEVICES renumbers."""
    _, dev = cu.cuDeviceGet(device)
    uuid = cuda.check(cu.cuDeviceGetUuid(dev), f"cuDeviceGetUuid({device})")
    h = uuid.bytes.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
        base, size = cuda.check(cu.cuMemGetAddressRange(ptr), f"cuMemGetAddressRange({ptr:#x})")
        base = int(base)
        if base not in bases:
            try:
                handle = cuda.check(cudart.cudaIpcGetMemHandle(base), "cudaIpcGetMemHandle")
            except CudaError as e:
                raise CudaError(
                    f"{e}: CUDA IPC mode needs tensors in cudaMalloc memory; allocations from "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True cannot be exported"
                ) from e
            bases[base] = len(regions)
            regions.append((ctypes.string_at(handle.getPtr(), HANDLE_BYTES), int(size)))
        copies.append((index, bases[base], ptr - base))
    return Export(device_uuid(device), regions, copies)
