"""thaw.daemon.fdsocket.free_slots: as many fds as it says fit in a process's fd table without
growing it (growing it in a process with threads waits for the kernel's RCU grace period), and
no more, in a fresh process with a thread, as an engine's connect() is; without /proc, all of
them at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.daemon.conftest import run_client
from thaw.daemon import fdsocket

PROBE = """
import json, os, threading, time
from thaw.daemon import fdsocket

def fd_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])

threading.Thread(target=time.sleep, args=(5,), daemon=True).start()  # the table is shared
free, before = fdsocket.free_slots(), fd_size()
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(free)]
fitted = fd_size()
fds += [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
print(json.dumps({"free": free, "before": before, "fitted": fitted, "after": fd_size()}))
"""


def test_the_free_slots_fit_without_growing_the_table_and_two_more_do_not() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out)
    assert r["free"] > 0
    assert r["fitted"] == r["before"]
    assert r["after"] > r["before"]


NO_PROC = """
from thaw.daemon import fdsocket

target = {{"w": torch.zeros(1 << 16)}}
with thaw.client.connect({socket!r}) as c:
    c.restore(target, "s")
print(json.dumps([os.path.exists("/proc/self/status"), fdsocket.free_slots(),
                  torch.equal(target["w"], torch.arange(1 << 16, dtype=torch.float32))]))
"""

# A new mount namespace with an empty tmpfs over /proc, for the command that follows.
HIDE_PROC = ("unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs none /proc && exec "$0" "$@"')  # fmt: skip


def test_without_proc_the_fds_are_taken_all_at_once_and_a_client_still_restores(
    thawd_factory: Any,
) -> None:
    """Where /proc cannot be read, free_slots cannot count: it says MAX_FDS (the table may
    grow once) rather than fail the client."""
    if shutil.which("unshare") is None or subprocess.run([*HIDE_PROC, "true"]).returncode:
        pytest.skip("needs a mount namespace of its own (unshare -m: root)")
    from thaw.client import connect

    d = thawd_factory()
    with connect(d.socket) as c:
        c.freeze({"w": torch.arange(1 << 16, dtype=torch.float32)}, "s", wait=True)
    out = run_client(NO_PROC.format(socket=d.socket), wrapper=HIDE_PROC)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, fdsocket.MAX_FDS, True]
