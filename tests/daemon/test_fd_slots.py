"""thaw.daemon.fdsocket.free_slots: as many fds as it says fit in a process's fd table without
growing it (growing it in a process with threads waits for the kernel's RCU grace period), and
no more, in a fresh process with a thread, as an engine's connect() is."""

from __future__ import annotations

import json
import subprocess
import sys

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
