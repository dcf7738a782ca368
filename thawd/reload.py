"""SIGHUP: read the config file again and apply what a running thawd can change.

Applied at once: the budgets, the allow-lists, the sockets' mode and group, the log level and
format, io_threads, mlock, drain_grace_s, repin_on_start. A budget lowered below what is in use
unpins nothing: new pins and freezes fail until use falls below it.

Kept at their running values, named in one WARNING line (they need a restart): `RESTART`, and
pinned_budget on a VMM pool (the pool is the pinned budget, created whole at start).

A file that no longer parses or validates changes nothing: one ERROR line, and thawd goes on
serving with its running configuration. systemd hears RELOADING=1 before, READY=1 after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from thaw.errors import ThawError
from thawd import logs
from thawd.budgets import human
from thawd.config import Config
from thawd.notify import notify
from thawd.security import AllowList, resolve_group
from thawd.state import Daemon

log = logging.getLogger("thawd.reload")

# What the running daemon holds open or built from them at start.
# s3: its client and cache are made at start (an allow list that shrinks must not leave a
# running client reading what the new list refuses halfway through a pin, either).
RESTART = ("socket", "state_dir", "pool", "vmm_chunk", "share_pool", "tcp_listen", "metrics_port",
           "s3")  # fmt: skip
SIZES = ("pinned_budget", "warm_budget", "vmm_chunk")


class HoldsAllowList(Protocol):
    """The interceptor and the fd socket server: each checks every call against `allow`."""

    allow: AllowList


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a reload does: `config` to run with, keys `changed` now and keys `kept` until a
    restart, each as (running value, value in the file)."""

    config: Config
    changed: dict[str, tuple[Any, Any]]
    kept: dict[str, tuple[Any, Any]]


def plan(running: Config, loaded: Config, pool_kind: str) -> Plan:
    restart = set(RESTART) | ({"pinned_budget"} if pool_kind == "vmm" else set())
    changed: dict[str, tuple[Any, Any]] = {}
    kept: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(Config):
        old, new = getattr(running, field.name), getattr(loaded, field.name)
        if old != new:
            (kept if field.name in restart else changed)[field.name] = (old, new)
    config = dataclasses.replace(loaded, **{key: old for key, (old, _) in kept.items()})
    return Plan(config, changed, kept)


def _show(key: str, value: Any) -> str:
    if key in SIZES:
        return human(value)
    if key == "socket_mode":
        return f"{value:04o}"
    return repr(value)


class Reloader:
    """Reloads on SIGHUP, one at a time; `load` reads the file with the command line's
    overrides applied again."""

    def __init__(self, load: Callable[[], Config], daemon: Daemon,
                 holders: list[HoldsAllowList]) -> None:  # fmt: skip
        self.load = load
        self.daemon = daemon
        self.holders = holders
        self._lock = asyncio.Lock()

    async def reload(self) -> None:
        async with self._lock:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")
            try:
                await self._reload()
            finally:
                notify("READY=1", f"STATUS=serving {len(self.daemon.entries)} snapshots on "
                       f"{self.daemon.config.socket}")  # fmt: skip

    async def _reload(self) -> None:
        running = self.daemon.config
        try:
            loaded = await asyncio.to_thread(self.load)
            gid = resolve_group(loaded.socket_group)
        except ThawError as e:
            log.error("reload refused, nothing changed, serving as before: %s", e)
            return
        p = plan(running, loaded, self.daemon.pool_kind)
        if p.kept:
            running_values = ", ".join(f"{k}={_show(k, old)}" for k, (old, _) in p.kept.items())
            log.warning("reload: %s need a restart to change; running with %s until then",
                        ", ".join(p.kept), running_values)  # fmt: skip
        if not p.changed:
            log.info("reloaded: no change that applies now")
            return
        new = p.config
        if {"socket_mode", "socket_group"} & p.changed.keys():
            try:
                for path in (new.socket, new.fd_socket):
                    os.chown(path, -1, gid)
                    os.chmod(path, new.socket_mode)
            except OSError as e:
                log.error("reload refused, nothing changed, serving as before: the sockets' "
                          "mode or group: %s", e)  # fmt: skip
                return
        allow = AllowList.build(new.allow_uids, new.allow_gids, gid)
        for holder in self.holders:
            holder.allow = allow
        logs.configure(new.log_level, new.log_format)
        self.daemon.config = new
        log.info("reloaded: %s", ", ".join(f"{k} {_show(k, old)} -> {_show(k, value)}"
                                           for k, (old, value) in p.changed.items()))  # fmt: skip
        for tier, used in (("pinned", self.daemon.pinned_used()),
                           ("warm", self.daemon.warm_used())):  # fmt: skip
            budget = getattr(new, f"{tier}_budget")
            if used > budget:
                log.warning("%s_budget %s is below the %s in use: nothing is unpinned; new %s "
                            "requests fail until use falls below it", tier, human(budget),
                            human(used), tier)  # fmt: skip
