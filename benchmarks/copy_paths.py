"""The copy primitives under thaw's data path, each measured in one process on one GPU: which
host memory, which copy size and how many streams reach the link's ceiling, both directions.

    python benchmarks/copy_paths.py [--size-gb 4]

Host memory kinds: cudaHostAlloc (the ceiling), VMM host memory in 256 MiB chunks as thawd's
pool makes it (mapped with and without CPU access), and a memfd mapping registered with
cudaHostRegister. Also the per-chunk costs a client pays to use a pool buffer: importing an
exported fd, and mapping it with or without CPU access.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import mmap
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import llama_shaped, nbytes, timed

from thaw import _native
from thaw.copy import binding, datapath
from thaw.format import layout
from thaw.format.dtypes import dtype_name
from thaw.mem import cuda, vmm
from thawd.buffers import Chunk

CHUNK = 256 << 20


def copies(
    direction: str,
    host: int,
    dev: int,
    size: int,
    piece: int,
    nstreams: int,
    streams: list[cuda.Stream],
) -> Callable[[], None]:
    copy = cuda.copy_h2d if direction == "H2D" else cuda.copy_d2h

    def run() -> None:
        for n, off in enumerate(range(0, size, piece)):
            length = min(piece, size - off)
            if direction == "H2D":
                copy(dev + off, host + off, length, streams[n % nstreams])
            else:
                copy(host + off, dev + off, length, streams[n % nstreams])
        for s in streams[:nstreams]:
            s.synchronize()

    return run


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=4.0)
    args = p.parse_args()
    size = int(args.size_gb * (1 << 30)) // CHUNK * CHUNK
    dev_buf = torch.ones(size, dtype=torch.uint8, device="cuda")
    dev = int(dev_buf.data_ptr())
    streams = [cuda.Stream() for _ in range(4)]
    print(f"{torch.cuda.get_device_name()}, {size / 2**30:.1f} GiB per copy", flush=True)

    hosts: dict[str, tuple[int, Callable[[], None]]] = {}
    pinned = cuda.PinnedBuffer(size)
    _native.prefault(pinned.addr, size, 8)
    hosts["cudaHostAlloc"] = (pinned.addr, pinned.close)

    t0 = time.perf_counter()
    chunks = [Chunk(CHUNK) for _ in range(size // CHUNK)]
    create_s = time.perf_counter() - t0
    for host_access in (True, False):
        t0 = time.perf_counter()
        buf = vmm.HostBuffer(
            [c.handle for c in chunks],
            [CHUNK] * len(chunks),
            0,
            owned=False,
            host_access=host_access,
        )
        map_s = time.perf_counter() - t0
        label = "VMM host, CPU access" if host_access else "VMM host, GPU access only"
        print(f"{label}: map {map_s / len(chunks) * 1e3:.2f} ms per 256 MiB chunk", flush=True)
        hosts[label] = (buf.addr, buf.close)
    print(f"VMM host: cuMemCreate {create_s / len(chunks) * 1e3:.1f} ms per 256 MiB chunk")

    fds = [c.export_fd() for c in chunks]
    t0 = time.perf_counter()
    imported = vmm.HostBuffer.import_fds(fds, [CHUNK] * len(fds), 0, lazy=True, host_access=False)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    imported.map_until(size)
    imap_s = time.perf_counter() - t0
    print(
        f"fd import: {import_s / len(fds) * 1e3:.2f} ms per chunk; "
        f"map without CPU access {imap_s / len(fds) * 1e3:.2f} ms per chunk"
    )
    imported.close()
    for fd in fds:
        os.close(fd)

    fd = os.memfd_create("thaw-probe")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    _native.prefault(addr, size, 8)
    t0 = time.perf_counter()
    cuda.register_host(addr, size)
    rate = size / (time.perf_counter() - t0) / 1e9
    print(f"cudaHostRegister of a memfd mapping: {rate:.1f} GB/s")
    hosts["memfd + cudaHostRegister"] = (addr, lambda: cuda.unregister_host(addr))

    print("\n| host memory | direction | copies | streams | GB/s |")
    print("|---|---|---|---|---|")
    for label, (host, _) in hosts.items():
        for direction in ("H2D", "D2H"):
            for piece, nstreams in (
                (size, 1),
                (64 << 20, 2),
                (256 << 20, 2),
                (64 << 20, 4),
                (256 << 20, 1),
            ):
                run = copies(direction, host, dev, size, piece, nstreams, streams)
                run()
                best = min(timed(run) for _ in range(3))
                what = "one" if piece == size else f"{piece >> 20} MB"
                print(
                    f"| {label} | {direction} | {what} | {nstreams} | {size / best / 1e9:.2f} |",
                    flush=True,
                )
    # CPU clients copy from pool memory with memcpy: the same host memory kinds, read by
    # 16 threads into ordinary (malloc'd, pre-faulted) memory.
    dst = torch.empty(size, dtype=torch.uint8)
    _native.prefault(int(dst.data_ptr()), size, 16)
    src = torch.ones(size, dtype=torch.uint8)
    hosts["malloc (baseline)"] = (int(src.data_ptr()), lambda: None)
    print("\n| host memory | CPU memcpy, 16 threads, GB/s |\n|---|---|")
    for label, (host, _) in hosts.items():
        if label == "VMM host, GPU access only":
            continue  # no CPU mapping
        run = functools.partial(_native.copy, int(dst.data_ptr()), host, size, 16)
        run()
        print(f"| {label} | {size / min(timed(run) for _ in range(3)) / 1e9:.2f} |", flush=True)
    for _, close in hosts.values():
        close()
    del dev_buf
    model_shaped(chunks, args.size_gb)


def model_shaped(chunks: list[Chunk], size_gb: float) -> None:
    """thaw's own loops (datapath) between Llama-shaped CUDA tensors and VMM host memory laid
    out like a payload: mapped up front, or imported from fds and mapped as the copy goes
    (a new process's first restore, every freeze into thawd)."""
    tensors = llama_shaped(size_gb * 0.9, torch.bfloat16, "cuda")
    entries = layout([(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()])
    bindings = binding.bind(entries, list(tensors.items()))
    size = nbytes(tensors)
    print(f"\nthaw's loops, {len(tensors)} Llama-shaped tensors, {size / 1e9:.2f} GB:")
    print("| host memory | direction | GB/s |\n|---|---|---|")
    fds = [c.export_fd() for c in chunks]
    sizes = [c.size for c in chunks]
    for how in ("mapped", "imported, mapped as the copy goes"):
        for direction in ("H2D", "D2H"):
            best = float("inf")
            for _ in range(3):
                lazy = how != "mapped"
                buf = vmm.HostBuffer.import_fds(fds, sizes, 0, lazy=lazy, host_access=False)
                ensure = buf.map_until if lazy else None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if direction == "H2D":
                    datapath.copy_direct_to_cuda(bindings, buf.addr, ensure)
                else:
                    datapath.copy_direct_from_cuda(bindings, buf.addr, ensure)
                best = min(best, time.perf_counter() - t0)
                buf.close()
            print(f"| VMM host, {how} | {direction} | {size / best / 1e9:.2f} |", flush=True)
    for fd in fds:
        os.close(fd)


if __name__ == "__main__":
    main()
