"""CUDA VMM host memory shared by fd across processes (the pinned tier's data path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from thaw import _native
from thaw.mem import cuda

HAVE_GPU = cuda.device_count() > 0  # 0 without a driver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU"),
]

SIZE = 64 << 20

IMPORTER = textwrap.dedent(
    """
    import sys, torch
    from thaw import _native
    from thaw.mem import vmm
    fd, size, expected = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.cuda.init()
    buf = vmm.HostBuffer.import_fds([fd], [size])
    assert _native.tree_hash(buf.addr, size, 4) == expected, "CPU view differs"
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    from thaw.mem import cuda
    s = cuda.Stream()
    cuda.copy_h2d(dst.data_ptr(), buf.addr, size, s)
    s.synchronize()
    back = dst.cpu()
    assert _native.tree_hash(back.data_ptr(), size, 4) == expected, "GPU copy differs"
    buf.close()
    print("ok")
    """
)


def test_vmm_host_buffer_shared_with_another_process() -> None:
    from thaw.mem import vmm

    if not vmm.supported():
        pytest.skip("this host has no shareable VMM host memory")
    buf = vmm.HostBuffer.create(SIZE)
    try:
        src = torch.randint(0, 256, (SIZE,), dtype=torch.uint8)
        _native.copy(buf.addr, int(src.data_ptr()), SIZE, 4)
        expected = _native.tree_hash(buf.addr, SIZE, 4)
        fd = buf.export_fd()
        try:
            out = subprocess.run(
                [sys.executable, "-c", IMPORTER, str(fd), str(buf.size), str(expected)],
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            os.close(fd)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"
    finally:
        buf.close()


def test_chunks_map_contiguously_in_another_process() -> None:
    """The pool's layout: several chunks, one contiguous mapping on each side."""
    from thaw.mem import vmm
    from thawd.buffers import Chunk, map_chunks

    if not vmm.supported():
        pytest.skip("this host has no shareable VMM host memory")
    chunk = vmm.granularity() * 4
    chunks = [Chunk(chunk) for _ in range(3)]
    buf = map_chunks(chunks, 0, ())
    fds = [c.export_fd() for c in chunks]
    try:
        src = torch.randint(0, 256, (buf.size,), dtype=torch.uint8)
        _native.copy(buf.addr, int(src.data_ptr()), buf.size, 4)
        expected = _native.tree_hash(buf.addr, buf.size, 4)
        code = IMPORTER.replace(
            "vmm.HostBuffer.import_fds([fd], [size])",
            f"vmm.HostBuffer.import_fds([fd, {fds[1]}, {fds[2]}], [{chunk}] * 3)",
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(fds[0]), str(buf.size), str(expected)],
            pass_fds=tuple(fds),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
    finally:
        for fd in fds:
            os.close(fd)
        buf.close()
        for c in chunks:
            c.release()


def test_create_close_does_not_leak() -> None:
    from thaw.mem import vmm

    if not vmm.supported():
        pytest.skip("this host has no shareable VMM host memory")
    import psutil

    rss = psutil.Process().memory_info().rss
    for _ in range(20):
        vmm.HostBuffer.create(SIZE).close()
    assert psutil.Process().memory_info().rss - rss < 32 << 20
