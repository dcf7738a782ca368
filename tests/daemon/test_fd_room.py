"""thaw.daemon.fdsocket.make_room: the fd table grows ahead of a batch of fds, and nothing is
left open, in a fresh process (its table still small) as a client's connect() would be."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

PROBE = """
import json, os, resource, sys
from thaw.daemon import fdsocket

def fd_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])

hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
if sys.argv[1] == "twice":  # past the table this process inherited, within the fd limit
    count = 2 * fd_size()
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
else:
    count = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), hard))
before = (fd_size(), sorted(os.listdir("/proc/self/fd")))
fdsocket.make_room(count)
after = (fd_size(), sorted(os.listdir("/proc/self/fd")))
print(json.dumps({"before": before, "after": after, "count": count}))
"""


def probe(*args: int | str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_the_table_has_room_for_the_fds_and_none_is_left_open() -> None:
    r = probe("twice")  # a process inherits a table as large as its parent's open fds need
    (size_before, open_before), (size_after, open_after) = r["before"], r["after"]
    assert size_before < len(open_before) + r["count"] <= size_after
    assert open_after == open_before


def test_past_the_fd_limit_it_does_nothing() -> None:
    """Room past RLIMIT_NOFILE cannot be made (the fds would not fit either): no error."""
    r = probe(200, 128)
    assert r["after"] == r["before"]
