"""thawd's TOML configuration: every key, its default, and parsing of sizes like "8GiB".

docs/DAEMON.md ("Configuration") documents the same keys; systemd/thawd.toml is an example.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI before 3.11 (thaw[daemon] installs it there)
    import tomli as tomllib

from thaw.errors import InvalidRequest
from thawd.s3 import config as s3config
from thawd.security import resolve_group

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
    # VMM pool chunk: buffers are whole chunks; a client maps one fd per chunk.
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
    log_format: str = "text"  # text | json (one object per line)
    # The [s3] table; off unless it allows some prefixes.
    s3: s3config.S3Config = dataclasses.field(default_factory=s3config.S3Config)

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


class ConfigError(InvalidRequest):
    """A config that thawd will not run with: one line naming the key and what to write."""


LOG_LEVELS = ("debug", "info", "warning", "error")
# A Unix socket's path fits sun_path: 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def _toml(value: object) -> str:
    """A value as it would be written in the file (`socket_mode = "0x660"`)."""
    return json.dumps(value) if isinstance(value, (str, bool, int, float, list)) else repr(value)


def _integer(value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):  # fmt: skip
        raise ValueError(f"write a whole number from {low}" + (f" to {high}" if high else " up"))
    return value


def _mode(value: object) -> int:
    # TOML has no 0660 literal (leading zeros); a string keeps the octal look operators expect.
    text = value.removeprefix("0o") if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif text and re.fullmatch(r"[0-7]{3,4}", text):
        mode = int(text, 8)
    else:
        raise ValueError('write the mode in octal, as a string: "0660"')
    if not 0 <= mode <= 0o777:
        raise ValueError('write permission bits only, at most "0777": "0660"')
    return mode


def _ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):  # fmt: skip
        raise ValueError("write a list of numeric ids: [1000, 1001]")
    return tuple(value)


def _choice(*choices: str) -> Any:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError("write one of " + ", ".join(f'"{c}"' for c in choices))
        return str(value)

    return check


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("write true or false")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("write a string in double quotes")
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError('write an absolute path in double quotes: "/run/thawd/thawd.sock"')
    return value


def _size(value: object) -> int:
    try:
        return parse_size(value)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise ValueError('write a size: "8GiB", "512MiB" or a number of bytes') from None


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("write a number of seconds: 10.0")
    return float(value)


# How each key is read from TOML; every error says what to write instead.
_PARSE: dict[str, Any] = {
    "socket": _path,
    "socket_mode": _mode,
    "socket_group": _text,
    "state_dir": _path,
    "pinned_budget": _size,
    "warm_budget": _size,
    "pool": _choice("auto", "memfd", "vmm"),
    "vmm_chunk": lambda v: _integer(_size(v), 1),
    "allow_uids": _ids,
    "allow_gids": _ids,
    "admin_group": _text,
    "repin_on_start": _flag,
    "share_pool": _flag,
    "io_threads": lambda v: _integer(v, 1, 256),
    "drain_grace_s": _seconds,
    "mlock": _flag,
    "tcp_listen": _text,
    "metrics_port": lambda v: _integer(v, 0, 65535),
    "log_level": _choice(*LOG_LEVELS),
    "log_format": _choice("text", "json"),
    "s3": lambda v: s3config.parse(v, _size, _seconds),
}


def load(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a config file (None: defaults only), then apply `overrides` (the command line's);
    every key is validated. ConfigError: one line naming the file, the key and what to write."""
    source = str(path) if path is not None else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the config: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for key in raw:
        if key not in _PARSE:
            close = difflib.get_close_matches(key, _PARSE, n=1)
            hint = f"did you mean {close[0]}?" if close else "the keys are in docs/DAEMON.md"
            raise ConfigError(f"{source}: unknown key {key}: {hint}")
    values: dict[str, Any] = {}
    for key, value in {**raw, **(overrides or {})}.items():
        origin = "command line" if key in (overrides or {}) else source
        try:
            values[key] = _PARSE[key](value)
        except ValueError as e:
            raise ConfigError(f"{origin}: {key} = {_toml(value)}: {e}") from None
    return Config(**values)


def check(config: Config, source: str) -> int:
    """What only the host can tell: the socket and admin groups exist, the socket's directory
    exists and thawd may create files there, the state directory is (or can be made) writable.
    Returns the socket group's gid; ConfigError otherwise. The socket's directory is never
    created: under systemd it is RuntimeDirectory=, made with the right owner and mode."""
    try:
        gid = resolve_group(config.socket_group)
    except InvalidRequest:
        raise ConfigError(f"{source}: socket_group = {_toml(config.socket_group)}: no such "
                          "group; write an existing group (getent group) or \"\" for thawd's "
                          "own") from None  # fmt: skip
    if config.admin_group:
        try:
            resolve_group(config.admin_group, "admin_group")
        except InvalidRequest:
            raise ConfigError(f"{source}: admin_group = {_toml(config.admin_group)}: no such "
                              "group; write an existing group (getent group) or \"\" for no "
                              "admins") from None  # fmt: skip
    if len(os.fsencode(config.fd_socket)) > MAX_SOCKET_PATH:
        raise ConfigError(f"{source}: socket = {_toml(config.socket)}: too long for a Unix "
                          f"socket with its fd socket {config.fd_socket} (at most "
                          f"{MAX_SOCKET_PATH} bytes); write a shorter path")  # fmt: skip
    directory = os.path.dirname(config.socket)
    if not os.path.isdir(directory):
        raise ConfigError(f"{source}: socket = {_toml(config.socket)}: no directory {directory}; "
                          "create it (systemd's RuntimeDirectory= does) or write a path in a "
                          "directory that exists")  # fmt: skip
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: socket = {_toml(config.socket)}: thawd (uid {os.getuid()}) "
                          f"may not create files in {directory}; write a path in a directory "
                          "it owns")  # fmt: skip
    existing = Path(config.state_dir)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{source}: state_dir = {_toml(config.state_dir)}: {existing} is not "
                          "a directory; write a directory thawd owns or can create")  # fmt: skip
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: state_dir = {_toml(config.state_dir)}: thawd (uid "
                          f"{os.getuid()}) may not write {existing}; write a directory it owns "
                          "or can create")  # fmt: skip
    return gid
