"""thawd's TOML configuration: every key, its default, and parsing of sizes like "8GiB".

docs/DAEMON.md ("Configuration") documents the same keys; systemd/thawd.toml is an example.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import tomllib

from thaw.errors import InvalidRequest

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Bytes from 1234, "1234", "8GiB", "1.5 GB" (SI and binary units, case-insensitive)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 8GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_socket() -> str:
    return "/run/thawd/thawd.sock"


@dataclasses.dataclass(frozen=True)
class Config:
    socket: str = dataclasses.field(default_factory=default_socket)
    socket_mode: int = 0o660
    socket_group: str = ""  # "" = the daemon's primary group
    state_dir: str = "/var/lib/thawd"
    pinned_budget: int = 8 << 30
    warm_budget: int = 16 << 30
    pool: str = "auto"  # auto | memfd | vmm
    # VMM pool chunk: buffers are whole chunks; a client maps one fd per chunk (at most 253).
    vmm_chunk: int = 256 << 20
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    # Members of this group (name or gid; "" = none) may unpin, unregister, re-pin and verify
    # any snapshot; everyone else only their own (docs/SECURITY.md).
    admin_group: str = ""
    repin_on_start: bool = True
    # Hand VMM pool memory to clients as fds (fastest). A VMM mapping is writable by whoever
    # imports it, so with false, CUDA clients get CUDA IPC copies by the daemon and CPU
    # clients the file: no client maps pinned bytes others restore. (A memfd pool is sealed
    # read-only: always shared.)
    share_pool: bool = True
    io_threads: int = 8
    drain_grace_s: float = 10.0
    mlock: bool = True
    tcp_listen: str = ""  # e.g. "127.0.0.1:7071"; off unless set (health only, see docs)
    metrics_port: int = 0  # Prometheus exporter on 127.0.0.1:PORT; 0 = off
    log_level: str = "info"

    @property
    def fd_socket(self) -> str:
        from thaw.daemon.fdsocket import fd_socket_path

        return fd_socket_path(self.socket)

    @property
    def registry_path(self) -> Path:
        return Path(self.state_dir) / "registry.sqlite3"

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.state_dir) / "snapshots"


def load(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a config file (None: defaults only), then apply `overrides`; validates every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    raw.update(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InvalidRequest(f"{path}: unknown configuration keys {unknown}")
    values: dict[str, Any] = {}
    try:
        for key, value in raw.items():
            if key in ("pinned_budget", "warm_budget", "vmm_chunk"):
                values[key] = parse_size(value)
            elif key == "socket_mode":
                values[key] = int(value, 8) if isinstance(value, str) else int(value)
            elif key in ("allow_uids", "allow_gids"):
                values[key] = tuple(int(v) for v in value)
            elif key in ("io_threads", "metrics_port"):
                values[key] = int(value)
            elif key == "drain_grace_s":
                values[key] = float(value)
            elif key in ("repin_on_start", "mlock", "share_pool"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
                values[key] = value
            else:
                values[key] = str(value)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"{path}: {e}") from e
    config = Config(**values)
    if config.pool not in ("auto", "memfd", "vmm"):
        raise InvalidRequest(f"{path}: pool must be auto, memfd or vmm, not {config.pool!r}")
    if config.io_threads < 1:
        raise InvalidRequest(f"{path}: io_threads must be at least 1")
    return config
