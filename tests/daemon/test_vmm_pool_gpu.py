"""The VMM pool on a GPU host: freeze CUDA tensors into thawd, restore them in new processes,
and a fragmented pool (buffers that are not one run of chunks)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.daemon.conftest import ThawdProcess, run_client

try:
    from thaw import vmm

    HAVE_VMM = vmm.supported()
except Exception:  # no driver: cuda-bindings cannot load
    HAVE_VMM = False

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_VMM, reason="needs CUDA VMM host memory"),
]

CHUNK = 4 << 20


def cuda_tensors(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {f"t{i}": torch.randn(1 << 20, generator=g, device="cuda") for i in range(n)}


RESTORE = """
g = torch.Generator(device="cuda").manual_seed({seed})
expected = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda") for i in range({n})}}
target = {{k: torch.zeros_like(v) for k, v in expected.items()}}
c = thaw.client.connect({socket!r})
first = c.restore(target, {name!r})
second = c.restore(target, {name!r})
print(json.dumps([first.tier, all(torch.equal(target[k], expected[k]) for k in expected)]))
"""


def test_freeze_restore_and_fragmented_pool(thawd_factory) -> None:  # type: ignore[no-untyped-def]
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        assert c.status().pool_kind == "vmm"
        c.freeze(cuda_tensors(1, 3), "a", wait=True)  # 12 MiB: chunks 0-2
        c.freeze(cuda_tensors(2, 2), "b")  # chunks 3-4
        c.unregister("a")  # frees 0-2; with 5-7 free too, 20 MiB is no single run of 8 chunks
        c.freeze(cuda_tensors(3, 5), "c")
        for name, seed, n in (("b", 2, 2), ("c", 3, 5)):
            out = run_client(RESTORE.format(seed=seed, n=n, socket=d.socket, name=name))
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout.strip().splitlines()[-1]) == ["pinned", True]
