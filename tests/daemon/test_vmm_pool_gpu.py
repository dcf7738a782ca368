"""The VMM pool on a GPU host: freeze CUDA tensors into thawd, restore them in new processes,
and a fragmented pool (buffers that are not one run of chunks)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from tests.daemon.conftest import ThawdProcess, run_client
from thaw.mem import vmm

HAVE_VMM = vmm.supported()  # False without a driver or a GPU

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
print(json.dumps([first.tier, first.delivery, second.delivery,
                  all(torch.equal(target[k], expected[k]) for k in expected)]))
"""


def test_freeze_restore_and_fragmented_pool(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        assert c.status().pool_kind == "vmm"
        c.freeze(cuda_tensors(1, 3), "a", wait=True)  # 12 MiB: chunks 0-2
        c.freeze(cuda_tensors(2, 2), "b")  # chunks 3-4
        c.unregister("a")  # frees 0-2; with 5-7 free too, 20 MiB is no single run of 8 chunks
        c.freeze(cuda_tensors(3, 5), "c")
        # A new CUDA process maps the whole pool at connect: "b", one run of chunks, needs no
        # fds; "c" is not one run, its fds come with the first restore.
        for name, seed, n, how in (("b", 2, 2, "pool"), ("c", 3, 5, "fds")):
            out = run_client(RESTORE.format(seed=seed, n=n, socket=d.socket, name=name))
            assert out.returncode == 0, out.stderr
            second = "mapped" if how == "fds" else how
            assert json.loads(out.stdout.strip().splitlines()[-1]) == ["pinned", how, second, True]


FD_TABLE = """
import threading
from thaw.daemon import fdsocket
def fd_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])
torch.cuda.init()
g = torch.Generator(device="cuda").manual_seed({seed})
expected = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda") for i in range({n})}}
target = {{k: torch.zeros_like(v) for k, v in expected.items()}}
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # as in any engine
free, before = fdsocket.free_slots(), fd_size()
c = thaw.client.connect({socket!r})
delivery = c.restore(target, {name!r}).delivery
print(json.dumps([free, before, fd_size(), delivery,
                  all(torch.equal(target[k], expected[k]) for k in expected)]))
"""


def test_a_pool_of_more_chunks_than_free_fd_slots_is_imported_without_growing_the_table(
    thawd_factory: Any,
) -> None:
    """connect() takes the pool's fds in batches that fit the process's fd table, importing
    and closing each batch before the next: no wait for the kernel to grow the table."""
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="512MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        c.freeze(cuda_tensors(6, 3), "a", wait=True)
    out = run_client(FD_TABLE.format(seed=6, n=3, socket=d.socket, name="a"))
    assert out.returncode == 0, out.stderr
    free, before, after, delivery, equal = json.loads(out.stdout.strip().splitlines()[-1])
    assert free < 512 // 4, "the pool's 128 chunks fit the table at once: nothing was tested"
    assert (after, delivery, equal) == (before, "pool", True)


DAEMON_COPY = """
g = torch.Generator(device="cuda").manual_seed({seed})
expected = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda") for i in range({n})}}
target = {{k: torch.zeros_like(v) for k, v in expected.items()}}
# A non-contiguous target goes through a temporary the daemon copies into.
target["t0"] = torch.zeros(2 << 20, device="cuda")[::2]
c = thaw.client.connect({socket!r})
results = [c.restore(target, {name!r}, mode={mode!r}).tier for _ in range(2)]
cpu = {{k: torch.zeros(v.shape, dtype=v.dtype) for k, v in expected.items()}}
cpu_tier = c.restore(cpu, {name!r}).tier if {cpu} else "skipped"
print(json.dumps([results, all(torch.equal(target[k], expected[k]) for k in expected),
                  all(torch.equal(cpu[k], expected[k].cpu()) for k in expected) if {cpu} else True,
                  sorted(c._restores._mappings), cpu_tier]))
"""


def test_daemon_copies_over_cuda_ipc_when_asked(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        c.freeze(cuda_tensors(4, 3), "a")
    code = DAEMON_COPY.format(seed=4, n=3, socket=d.socket, name="a", mode="ipc", cpu=False)
    out = run_client(code)
    assert out.returncode == 0, out.stderr
    # Both restores copied by the daemon: this process mapped no pool memory.
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        ["pinned", "pinned"],
        True,
        True,
        [],
        "skipped",
    ]


def test_share_pool_false_maps_no_pool_memory(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(
        pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK, share_pool=False
    )
    from thaw.client import connect

    with connect(d.socket) as c:
        assert c.status().share_pool is False
        assert c._conn._pool is None and not c.map_pool(0)  # no pool to map whole either
        c.freeze(cuda_tensors(5, 2), "b", wait=True)  # CPU clients read the file
    code = DAEMON_COPY.format(seed=5, n=2, socket=d.socket, name="b", mode="auto", cpu=True)
    out = run_client(code)
    assert out.returncode == 0, out.stderr
    # CUDA tensors: daemon copies; CPU tensors: the file, mapped for the copy and dropped.
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        ["pinned", "pinned"],
        True,
        True,
        [],
        "pinned",
    ]


def test_expandable_segments_cannot_take_a_daemon_copy(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        c.freeze(cuda_tensors(6, 1), "e")
    code = (
        "os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'\n"
        + DAEMON_COPY.format(seed=6, n=1, socket=d.socket, name="e", mode="ipc", cpu=False)
    )
    out = run_client(code)
    assert out.returncode != 0
    assert "CudaError" in out.stderr and "expandable_segments" in out.stderr, out.stderr
    with connect(d.socket) as c:
        assert c.stat("e").clients == 0


FREEZE_EXPANDABLE = """
os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'
g = torch.Generator(device="cuda").manual_seed(7)
tensors = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda") for i in range(2)}}
c = thaw.client.connect({socket!r})
c.freeze(tensors, "x")  # no IPC handle for these allocations: the client maps the pool instead
target = {{k: torch.zeros_like(v) for k, v in tensors.items()}}
c.restore(target, "x")
print(json.dumps(all(torch.equal(target[k], tensors[k]) for k in tensors)))
"""


def test_freeze_of_expandable_segments_maps_the_pool(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    out = run_client(FREEZE_EXPANDABLE.format(socket=d.socket))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True


RESTORE_MANY = """
expected = {{}}
for seed in range(3):
    g = torch.Generator(device="cuda").manual_seed(10 + seed)
    expected[f"m{{seed}}"] = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda")
                             for i in range(2)}}
targets = {{n: {{k: torch.zeros_like(v) for k, v in t.items()}} for n, t in expected.items()}}
targets["m1"]["t1"] = torch.zeros(2 << 20, device="cuda")[::2]  # a temporary: waited for
c = thaw.client.connect({socket!r})
for _ in range(2):  # from the whole pool, mapped at connect, both times
    results = c.restore_many([(targets[n], n) for n in expected])
    ok = all(torch.equal(targets[n][k], expected[n][k]) for n in expected for k in expected[n])
    print(json.dumps([[(r.name, r.delivery) for r in results], ok]))
"""


def test_restore_many_into_cuda_tensors(thawd_factory: Any) -> None:
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(10 + seed)
            c.freeze(
                {f"t{i}": torch.randn(1 << 20, generator=g, device="cuda") for i in range(2)},
                f"m{seed}",
            )
    out = run_client(RESTORE_MANY.format(socket=d.socket))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert lines == [[[["m0", "pool"], ["m1", "pool"], ["m2", "pool"]], True]] * 2


WAKE = """
from thaw.copy import datapath
g = torch.Generator(device="cuda").manual_seed({seed})
expected = {{f"t{{i}}": torch.randn(1 << 20, generator=g, device="cuda") for i in range({n})}}
target = {{k: torch.zeros_like(v) for k, v in expected.items()}}
c = thaw.client.connect({socket!r})
c.restore(target, {name!r})  # maps the buffer's chunks, chunk 0 among them
scratch = datapath.Staging.for_device(0).wake_target
scratch.fill_(0xAB)
torch.cuda.synchronize()
for t in target.values():
    t.zero_()
delivery = c.restore(target, {name!r}).delivery
torch.cuda.synchronize()
print(json.dumps([delivery,
                  torch.equal(scratch, expected["t0"].view(torch.uint8)[: datapath.WAKE_BYTES]),
                  all(torch.equal(target[k], expected[k]) for k in expected)]))
"""


def test_a_restore_from_the_pool_map_wakes_the_link_into_its_own_scratch(
    thawd_factory: Any,
) -> None:
    """Before it waits for the open's reply, a restore from the pool map copies the first
    mapped chunk's first 2 MiB (here: the start of the snapshot's first tensor, at chunk 0)
    into thaw's own scratch buffer, and into nothing else."""
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    from thaw.client import connect

    with connect(d.socket) as c:
        c.freeze(cuda_tensors(9, 2), "w", wait=True)  # chunks 0-1
    out = run_client(WAKE.format(seed=9, n=2, socket=d.socket, name="w"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["pool", True, True]


def test_daemon_copy_refuses_bad_requests(thawd_factory: Any) -> None:
    """An unknown GPU and a copy past the end of its region are refused by name."""
    from thaw import errors
    from thaw._proto import thawd_pb2 as pb
    from thaw.client import connect
    from thaw.copy import daemon_copy

    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    with connect(d.socket) as c:
        c.freeze(cuda_tensors(8, 1), "r")
        small = torch.zeros(1 << 10, device="cuda")  # far smaller than the 4 MiB tensor
        exported = daemon_copy.export([(0, small)], 0)
        ((handle, _),) = exported.regions
        for uuid, region_size, match in (
            ("GPU-00000000-0000-0000-0000-000000000000", 4 << 20, "does not see GPU"),
            (exported.device_uuid, 4 << 10, "does not fit region 0"),
        ):
            info = c._conn.call("OpenRestore", pb.OpenRestoreRequest(name="r", daemon_copy=True))
            with pytest.raises(errors.InvalidRequest, match=match):
                c._conn.call(
                    "CopyInto",
                    pb.DaemonCopyRequest(
                        session_id=info.session_id,
                        device_uuid=uuid,
                        regions=[pb.GpuRegion(ipc_handle=handle, size=region_size)],
                        copies=[pb.GpuCopy(tensor=0, region=0, offset=0)],
                    ),
                )
            c._conn.call("CloseRestore", pb.CloseRestoreRequest(session_id=info.session_id))
        assert c.stat("r").clients == 0


def test_pool_op_refuses_chunks_out_of_range(thawd_factory: Any) -> None:
    from thaw.daemon import fdsocket

    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    sock = fdsocket.connect(fdsocket.fd_socket_path(d.socket))
    with sock:
        fdsocket.send(sock, {"op": "auth"})
        auth, _ = fdsocket.recv(sock)
        chunks = auth["pool"]["chunks"]
        replies = []
        for start in (chunks - 1, chunks, -1):
            fdsocket.send(sock, {"op": "pool", "start": start})
            reply, fds = fdsocket.recv(sock)
            for fd in fds:
                os.close(fd)
            replies.append((reply["ok"], len(fds), reply.get("message", "")))
        fdsocket.send(sock, {"op": "pool", "start": 2, "count": 3})  # what the fd table holds
        reply, fds = fdsocket.recv(sock)
        for fd in fds:
            os.close(fd)
        assert (reply["start"], len(fds), len(reply["sizes"])) == (2, 3, 3)
    assert chunks == 8 and replies[0] == (True, 1, "")
    past_the_end, negative = replies[1:]
    assert past_the_end[:2] == (False, 0) and f"out of range 0..{chunks - 1}" in past_the_end[2]
    assert negative[:2] == (False, 0) and "start must be an integer in [0," in negative[2]


def test_pool_map_follows_thawd_restarts(thawd_factory: Any) -> None:
    """A client's map of the whole pool goes when thawd stops (its pinned memory is not held
    by former clients) and a new one comes with the restarted thawd's pool."""
    import time

    from thaw.client import connect

    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    torch.cuda.init()  # connect() maps the pool in a process that uses CUDA
    with connect(d.socket) as c:
        tensors = cuda_tensors(20, 2)
        c.freeze(tensors, "p", wait=True)
        target = {k: torch.zeros_like(v) for k, v in tensors.items()}
        assert c.restore(target, "p").delivery == "pool"
        assert all(torch.equal(target[k], tensors[k]) for k in tensors)
        first = c._conn._pool_map
        assert first is not None and first.alive
        d.restart()  # re-pins "p" into a new pool
        deadline = time.monotonic() + 10
        while first.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not first.alive  # thawd's EOF released the map
        # The first call re-authenticates and maps the new pool; this restore opened before
        # that takes the buffer's fds, and later ones, with no cached mapping, the new pool.
        assert c.restore(target, "p").delivery == "fds"
        c.forget("p")
        target = {k: torch.zeros_like(v) for k, v in tensors.items()}
        assert c.restore(target, "p").delivery == "pool"
        assert all(torch.equal(target[k], tensors[k]) for k in tensors)
        assert c._conn._pool_map is not None and c._conn._pool_map.pool_id != first.pool_id


def test_a_restore_holding_the_map_survives_a_thawd_restart(thawd_factory: Any) -> None:
    """thawd restarts while a restore holds the pool map: the restore's next call finds the
    restart and re-authenticates, and the old map must go once that restore lets it go, not
    wait for it in the same thread (a deadlock before)."""
    import threading

    from thaw.client import connect

    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="32MiB", vmm_chunk=CHUNK)
    torch.cuda.init()
    with connect(d.socket) as c:
        c.freeze(cuda_tensors(21, 2), "p", wait=True)
        first = c._conn._pool_map
        held = c._conn.hold_pool()  # as a restore does before it opens
        assert first is not None and held is not None
        d.restart()
        done = threading.Event()

        def reauthenticate() -> None:
            c._conn.authenticate()  # what the restore's open does when it finds the restart
            done.set()

        worker = threading.Thread(target=reauthenticate, daemon=True)
        worker.start()
        assert done.wait(20), "re-authentication waited for the map its own thread holds"
        assert c._conn._pool_map is not None and c._conn._pool_map.pool_id != first.pool_id
        held.release()  # the restore ends: now the old map goes
        first._thread.join(20)
        assert not first.alive


def test_a_buffer_of_more_chunks_than_one_message_carries(thawd_factory: Any) -> None:
    """A pool buffer of 260 chunks, more than the 253 fds one fd-socket message carries
    (SCM_MAX_FD; a 70 GB shard in 256 MiB chunks), is handed over in turns: a CPU restore,
    which maps the buffer from its fds, gets every byte (it was "thawd went away")."""
    d: ThawdProcess = thawd_factory(pool="vmm", pinned_budget="600MiB", vmm_chunk=2 << 20)
    from thaw.client import connect

    tensors = cuda_tensors(5, 130)  # 520 MiB: 260 chunks of 2 MiB
    with connect(d.socket) as c:
        c.freeze(tensors, "big")
        cpu = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in tensors.items()}
        assert c.restore(cpu, "big").tier == "pinned"
    assert all(torch.equal(cpu[k], tensors[k].cpu()) for k in tensors)
