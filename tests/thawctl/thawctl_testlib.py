"""Helpers for thawctl's tests: the real-thawd fixtures of tests/daemon, a result type,
a subprocess runner, file damage, and the --json schemas the tests hold thawctl to.

The daemon comes from tests/daemon/conftest.py (ThawdProcess: a real `python -m thawd`
started on a temporary socket and config, ready when it sends READY=1): the same pattern, the
same code.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.daemon.conftest import ThawdProcess, make_dir, random_tensors, write_snapshot

ROOT = Path(__file__).resolve().parents[2]

# Re-exported for thawctl's tests: the real daemon and its fixture snapshots.
__all__ = ["ThawdProcess", "make_dir", "random_tensors", "write_snapshot"]


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        import json

        return json.loads(self.out)


def run_subprocess(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m thawctl ARGS...` in a fresh interpreter (stdout is a pipe, not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "thawctl", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )


def corrupt_payload(path: Path, tensor: str = "embed.weight") -> None:
    """Flip one byte inside `tensor`'s bytes; header and manifest stay valid."""
    from thaw import open_snapshot

    snap = open_snapshot(path)
    entry = snap.tensor(tensor)
    with open(path, "r+b") as f:
        f.seek(snap.payload_offset + entry.offset + entry.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- the --json schemas (docs/THAWCTL.md); keys may be added, never removed ---------------------

SNAPSHOT_KEYS = {
    "name",
    "path",
    "labels",
    "tier",
    "wanted_tier",
    "size_bytes",
    "file_bytes",
    "resident_bytes",
    "resident_fraction",
    "clients",
    "restores",
    "last_restore_unix",
    "registered_unix",
    "checksum_state",
    "tensor_count",
    "fingerprint",
    "error",
    "file_pending",
    "owner_uid",
    "content_id",
}
STATUS_KEYS = {
    "version",
    "api_version",
    "pid",
    "started_unix",
    "uptime_s",
    "socket",
    "pool_kind",
    "memory_locked",
    "share_pool",
    "pinned",
    "warm",
    "host_memory",
    "gpus",
    "snapshots",
    "active_restores",
    "active_freezes",
    "restores_total",
    "bytes_restored_total",
}
FILE_INFO_KEYS = {
    "path",
    "format_version",
    "checksum_algorithm",
    "file_bytes",
    "payload_offset",
    "payload_bytes",
    "tensor_bytes",
    "tensor_count",
    "bytes_by_dtype",
    "fingerprint",
    "tensors",
}
TENSOR_KEYS = {"name", "dtype", "shape", "offset", "length", "checksum"}
VERIFY_KEYS = {
    "source",
    "name",
    "path",
    "ok",
    "tensor_count",
    "bytes",
    "seconds",
    "mismatches",
    "daemon_checksum_state",
    "read_from",
}
PIN_KEYS = {"snapshot", "seconds", "bytes", "registered"}
BENCH_KEYS = {"device", "snapshot", "repeat", "results", "skipped"}
BENCH_RESULT_KEYS = {
    "tier",
    "source",
    "bytes",
    "best_seconds",
    "best_gbps",
    "first_gbps",
    "median_gbps",
    "runs_gbps",
}


def assert_keys(doc: dict, keys: set[str]) -> None:
    """`doc` has exactly the documented keys."""
    assert set(doc) == keys, f"extra {set(doc) - keys}, missing {keys - set(doc)}"


NO_DAEMON = "/nonexistent/thawd.sock"


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (never a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("thawctl: error: "), err
    assert "Traceback" not in err
    return lines[0]
