"""thaw's CUDA calls, all through cuda-python (cuda.bindings), imported only where CUDA is used.

Every failing call, runtime or driver, raises CudaError naming the call and CUDA's error
(`check`, the one place that turns a cuda.bindings result into a value or an exception).
"""

from __future__ import annotations

import threading
from typing import Any

from cuda.bindings import driver as cu
from cuda.bindings import runtime as cudart

from thaw.errors import CudaError

_SUCCESS = cudart.cudaError_t.cudaSuccess


def check(result: tuple[Any, ...], call: str) -> Any:
    """Unwrap a cuda.bindings result tuple (runtime or driver API), raising CudaError on
    failure: None, the one value, or the tuple of values after the error code."""
    err = result[0]
    if isinstance(err, cu.CUresult):
        if err != cu.CUresult.CUDA_SUCCESS:
            _, name = cu.cuGetErrorName(err)
            raise CudaError(f"{call} failed: {name.decode() if name else err}")
    elif err != _SUCCESS:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {name.decode()}: {text.decode()}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def device_count() -> int:
    """CUDA devices visible to this process; 0 where there is no driver or no GPU."""
    err, count = cudart.cudaGetDeviceCount()
    return count if err == _SUCCESS else 0


def set_device(index: int) -> None:
    check(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")


def device_synchronize() -> None:
    check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


class PinnedBuffer:
    """Page-locked host memory from cudaHostAlloc (portable: usable from every device)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.addr = int(
            check(
                cudart.cudaHostAlloc(size, cudart.cudaHostAllocPortable),
                f"cudaHostAlloc({size})",
            )
        )

    def close(self) -> None:
        if self.addr:
            check(cudart.cudaFreeHost(self.addr), "cudaFreeHost")
            self.addr = 0


class Stream:
    """A non-blocking stream; thaw's streams live as long as the process (Staging caches them)."""

    def __init__(self) -> None:
        self.handle = check(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class Event:
    def __init__(self) -> None:
        self.handle = check(
            cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming),
            "cudaEventCreateWithFlags",
        )

    def record(self, stream: Stream) -> None:
        check(cudart.cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart.cudaEventSynchronize(self.handle), "cudaEventSynchronize")


_H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
_D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost


def copy_h2d(dst: int, src: int, length: int, stream: Stream) -> None:
    check(cudart.cudaMemcpyAsync(dst, src, length, _H2D, stream.handle), "cudaMemcpyAsync(H2D)")


def copy_d2h(dst: int, src: int, length: int, stream: Stream) -> None:
    check(cudart.cudaMemcpyAsync(dst, src, length, _D2H, stream.handle), "cudaMemcpyAsync(D2H)")


_registrations: dict[int, int] = {}
_registrations_lock = threading.Lock()


def register_host(addr: int, length: int, read_only: bool = False) -> None:
    """Page-lock an existing mapping once per process; later calls for it are free.

    This is what a CUDA client does once with a memfd pool mapping: ~16 GB/s of registration,
    paid on the first restore from that mapping and cached for every later one.
    """
    with _registrations_lock:
        if _registrations.get(addr, 0) >= length:
            return
        if addr in _registrations:
            check(cudart.cudaHostUnregister(addr), "cudaHostUnregister")
            del _registrations[addr]
        flags = cudart.cudaHostRegisterPortable
        if read_only:
            flags |= cudart.cudaHostRegisterReadOnly
        check(cudart.cudaHostRegister(addr, length, flags), f"cudaHostRegister({length})")
        _registrations[addr] = length


def unregister_host(addr: int) -> None:
    """Drop a registration made by register_host (before the mapping is unmapped)."""
    with _registrations_lock:
        if _registrations.pop(addr, None) is not None:
            check(cudart.cudaHostUnregister(addr), "cudaHostUnregister")
