"""Freeze and restore of CUDA tensors: pinned staging on two streams, O_DIRECT, registered memory.

Runs only where CUDA is (the GPU machine); skipped elsewhere.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from thaw import _native, freeze_file, open_snapshot, restore_file
from thaw.copy.binding import Binding
from thaw.copy.datapath import SLOT_SIZE, copy_from_tensors, copy_to_tensors
from thaw.errors import ChecksumMismatch, RestoreIncomplete
from thaw.format import Manifest, layout
from thaw.format.dtypes import dtype_name
from thaw.format.fingerprint import Fingerprint
from thaw.mem import cuda as thaw_cuda

DEVICES = thaw_cuda.device_count()  # 0 without a driver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICES == 0 or not torch.cuda.is_available(), reason="needs a CUDA GPU and CUDA torch"
    ),
]

MiB = 1 << 20


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in logical order, on its own device."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    dense = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return dense.reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(as_bytes(a), as_bytes(b).to(a.device))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device=gen.device, generator=gen)
    return raw.view(dtype).reshape(shape)


def model(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp16/bf16 tensors: one across two 64 MiB slot boundaries, one just over a slot, small
    ones that share a slot, a scalar, an empty one and a non-contiguous (transposed) one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {
        "norm": random_tensor(torch.float16, (4096,), gen),
        "embed": random_tensor(torch.float16, (34_000, 2048), gen),  # ~133 MiB: three pieces
        "scalar": random_tensor(torch.bfloat16, (), gen),
        "big": random_tensor(torch.bfloat16, (SLOT_SIZE // 2 + 12_345,), gen),  # a slot + 24 KB
        "empty": random_tensor(torch.float16, (0, 16), gen),
        "transposed": random_tensor(torch.bfloat16, (3000, 1000), gen).t(),
        "head": random_tensor(torch.float16, (1000, 1024), gen),
    }


def zeros_like_model(source: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Zeroed targets on `device`; the transposed tensor's target is a transposed view too."""
    out = {}
    for name, t in source.items():
        if name == "transposed":
            out[name] = torch.zeros(tuple(reversed(t.shape)), dtype=t.dtype, device=device).t()
        else:
            out[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)
    return out


def assert_same(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    torch.cuda.synchronize()
    for name in source:
        assert same_bytes(source[name], target[name]), name


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def drop_page_cache(path: Path) -> float:
    """Write back and drop the file's pages; return the share of the payload still cached."""
    snapshot = open_snapshot(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        resident = _native.resident_bytes(fd, snapshot.payload_offset, snapshot.payload_length)
    finally:
        os.close(fd)
    return resident / max(1, snapshot.payload_length)


def flip(path: Path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x01]))


def set_cache(path: Path, cache: str) -> float:
    if cache == "warm":
        warm_page_cache(path)
        return 1.0
    return drop_page_cache(path)


def check_source(stats: Any, cache: str, resident: float) -> None:
    if cache == "warm":
        assert stats.source == "page cache"
    elif resident < 0.5:  # where the filesystem honours DONTNEED, the read went to disk
        assert stats.source == "disk"


# --- freeze_file / restore_file -------------------------------------------------------------


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_cuda_round_trip(tmp_path: Path, cache: Any) -> None:
    source = model("cuda")
    path = tmp_path / "m.thaw"
    freeze_file(source, path)
    resident = set_cache(path, cache)
    target = zeros_like_model(source, "cuda")
    stats = restore_file(target, path)
    assert_same(source, target)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in source.values())
    check_source(stats, cache, resident)


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_cpu_snapshot_into_cuda_model(tmp_path: Path, cache: Any) -> None:
    source = model("cpu", seed=1)
    path = tmp_path / "cpu.thaw"
    freeze_file(source, path)
    resident = set_cache(path, cache)
    target = zeros_like_model(source, "cuda")
    stats = restore_file(target, path)
    assert_same(source, target)
    check_source(stats, cache, resident)


def test_cuda_snapshot_into_cpu_model(tmp_path: Path) -> None:
    source = model("cuda", seed=2)
    path = tmp_path / "cuda.thaw"
    freeze_file(source, path)
    target = zeros_like_model(source, "cpu")
    restore_file(target, path)
    assert_same(source, target)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 * MiB):
            h.update(chunk)
    return h.hexdigest()


def test_cuda_and_cpu_freeze_write_identical_files(tmp_path: Path) -> None:
    """A snapshot's bytes depend on the tensors only: gaps in staging slots are zeroed."""
    source = model("cuda", seed=3)
    freeze_file(source, tmp_path / "from_cuda.thaw")
    freeze_file({k: v.cpu() for k, v in source.items()}, tmp_path / "from_cpu.thaw")
    assert file_digest(tmp_path / "from_cuda.thaw") == file_digest(tmp_path / "from_cpu.thaw")


def mixed_model(seed: int = 4) -> dict[str, torch.Tensor]:
    """CUDA and CPU tensors interleaved in payload order (a partly offloaded model)."""
    cuda_gen = torch.Generator(device="cuda").manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    return {
        "g0": random_tensor(torch.float16, (1000,), cuda_gen),
        "c0": random_tensor(torch.float16, (3000,), cpu_gen),
        "g1": random_tensor(torch.bfloat16, (2000,), cuda_gen),
        "c1": random_tensor(torch.bfloat16, (5, 7), cpu_gen),
        "g2": random_tensor(torch.float16, (SLOT_SIZE // 2 + 99,), cuda_gen),
    }


def test_mixed_cpu_and_cuda_model_round_trips(tmp_path: Path) -> None:
    source = mixed_model()
    path = tmp_path / "mixed.thaw"
    freeze_file(source, path)
    target = {name: torch.zeros_like(t) for name, t in source.items()}  # same devices
    restore_file(target, path)
    assert_same(source, target)


@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize(
    ("name", "where"),
    [("embed", 2 * SLOT_SIZE + 777), ("norm", 5), ("big", SLOT_SIZE + 1)],
    ids=["embed-third-piece", "norm", "big-second-piece"],
)
def test_corrupt_payload_byte(tmp_path: Path, cache: Any, name: str, where: Any) -> None:
    source = model("cuda", seed=5)
    path = tmp_path / "bad.thaw"
    freeze_file(source, path)
    snapshot = open_snapshot(path)
    flip(path, snapshot.payload_offset + snapshot.tensor(name).offset + where)

    set_cache(path, cache)
    with pytest.raises(RestoreIncomplete) as info:
        restore_file(zeros_like_model(source, "cuda"), path)
    cause = info.value.__cause__
    assert type(cause) is ChecksumMismatch
    assert cause.tensor == name

    set_cache(path, cache)
    target = zeros_like_model(source, "cuda")
    restore_file(target, path, verify=False)
    torch.cuda.synchronize()
    for other in source:
        assert same_bytes(source[other], target[other]) == (other != name), other

    # The staging buffers are fine after a failed restore.
    good = tmp_path / "good.thaw"
    freeze_file(source, good)
    target = zeros_like_model(source, "cuda")
    restore_file(target, good)
    assert_same(source, target)


# --- datapath with host memory laid out like the payload ------------------------------------


class HostPayload:
    """Anonymous page-aligned memory laid out like a snapshot's payload, registered with CUDA."""

    def __init__(self, entries: Any) -> None:
        self.entries = entries
        self.length = max(4096, Manifest(Fingerprint(), tuple(entries)).payload_length)
        self.buf = mmap.mmap(-1, self.length)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        thaw_cuda.register_host(self.addr, self.length)

    def tensor_bytes(self, entry: Any) -> bytes:
        return self.buf[entry.offset : entry.offset + entry.length]

    def flip(self, position: int) -> None:
        self.buf[position] ^= 0x01

    def close(self) -> None:
        thaw_cuda.unregister_host(self.addr)


@pytest.fixture
def host_payload() -> Iterator[Any]:
    made = []

    def make(entries: Any) -> HostPayload:
        made.append(HostPayload(entries))
        return made[-1]

    yield make
    for payload in made:
        payload.close()


def entries_for(source: dict[str, torch.Tensor]) -> Any:
    return layout([(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in source.items()])


def cpu_bytes(t: torch.Tensor) -> bytes:
    return as_bytes(t).cpu().numpy().tobytes()


@pytest.mark.parametrize("gpu_accessible", [True, False], ids=["direct", "staged"])
def test_copy_through_registered_host_memory(host_payload: Any, gpu_accessible: Any) -> None:
    source = model("cuda", seed=6)
    entries = entries_for(source)
    payload = host_payload(entries)

    n = copy_from_tensors(
        [Binding(e, source[e.name]) for e in entries], payload.addr, gpu_accessible=gpu_accessible
    )
    assert n == sum(e.length for e in entries)
    for e in entries:
        assert payload.tensor_bytes(e) == cpu_bytes(source[e.name]), e.name

    target = zeros_like_model(source, "cuda")
    copied = copy_to_tensors(
        [Binding(e, target[e.name]) for e in entries], payload.addr, gpu_accessible=gpu_accessible
    )
    assert copied == n
    assert_same(source, target)

    # With checksums recorded as freeze records them, a verified copy passes...
    entries = [
        dataclasses.replace(e, checksum=_native.tree_hash(payload.addr + e.offset, e.length))
        for e in entries
    ]
    target = zeros_like_model(source, "cuda")
    copy_to_tensors(
        [Binding(e, target[e.name]) for e in entries],
        payload.addr,
        gpu_accessible=gpu_accessible,
        verify=True,
    )
    assert_same(source, target)

    # ...and a flipped byte in the third piece of the big tensor is named.
    embed = next(e for e in entries if e.name == "embed")
    payload.flip(embed.offset + 2 * SLOT_SIZE + 3)
    with pytest.raises(ChecksumMismatch) as info:
        copy_to_tensors(
            [Binding(e, zeros_like_model(source, "cuda")[e.name]) for e in entries],
            payload.addr,
            gpu_accessible=gpu_accessible,
            verify=True,
        )
    assert info.value.tensor == "embed"


@pytest.mark.parametrize("gpu_accessible", [True, False], ids=["direct", "staged"])
def test_copy_from_mixed_tensors_keeps_cpu_bytes(host_payload: Any, gpu_accessible: Any) -> None:
    """CPU tensors between CUDA ones keep their bytes when the CUDA ones are staged around them."""
    source = mixed_model()
    entries = entries_for(source)
    payload = host_payload(entries)
    copy_from_tensors(
        [Binding(e, source[e.name]) for e in entries], payload.addr, gpu_accessible=gpu_accessible
    )
    for e in entries:
        assert payload.tensor_bytes(e) == cpu_bytes(source[e.name]), e.name

    target = {name: torch.zeros_like(t) for name, t in source.items()}
    copy_to_tensors(
        [Binding(e, target[e.name]) for e in entries], payload.addr, gpu_accessible=gpu_accessible
    )
    assert_same(source, target)


FAILED_COPY = """
import os, sys, torch
from thaw.copy.datapath import Staging
from thaw.errors import CudaError
from thaw.mem import cuda

torch.zeros(1, device="cuda")
cuda.set_device(0)
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    # 4096: an address that is no device memory (and no mapping of this process at all)
    cuda.read_to_device(fd, [4096], [0], [8 << 20], Staging.for_device(0).bounce(2), 2, 0, True)
except CudaError as e:
    print("CudaError:", e)
"""


def test_a_copy_the_driver_refuses_is_raised_as_a_cuda_error(tmp_path: Path) -> None:
    """The native loop's failed driver call, from the real driver, reaches Python as CudaError
    naming the call. In a process of its own: what the driver makes of the address may
    leave the context unusable."""
    import subprocess
    import sys

    path = tmp_path / "bytes.bin"
    path.write_bytes(os.urandom(8 * MiB))
    out = subprocess.run(
        [sys.executable, "-c", FAILED_COPY, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"^CudaError: cu\w+ failed", out.stdout, re.M), out.stdout
