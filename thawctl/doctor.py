"""`thawctl doctor`: is this host set up for thaw? One line per check: pass, warn, fail or skip.

The checks look at what the documentation tells an operator to set up (docs/DAEMON.md): the
socket and who may connect to it, thawd itself, its locked-memory limit against its pinned
budget, CUDA VMM host memory, the GPUs' PCIe links, and page-cache room for the snapshots that
are not pinned. Exit code 0 when nothing failed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thawctl import exitcodes, render
from thawctl.context import Context

STATES = ("pass", "warn", "fail", "skip")
PCI_DEVICES = "/sys/bus/pci/devices"
NVIDIA_VENDOR = "0x10de"
# PCIe transfer rate per lane (GT/s) -> generation.
GENERATIONS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}
UNIT_HINT = "set LimitMEMLOCK=infinity in thawd.service (systemd/thawd.service does)"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    state: str  # pass | warn | fail | skip
    detail: str
    hint: str = ""  # what to do, for warn and fail

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        parents=[parents["json"], parents["socket"]],
        help="check this host's setup for thaw (socket, limits, GPUs, memory)",
        description="Check what thaw needs from this host: the socket (exists, mode, group) and "
        "whether you may connect, your membership of the socket's group, thawd (reachable, "
        "version), thawd's RLIMIT_MEMLOCK against its pinned budget, CUDA VMM host memory, "
        "the GPUs' PCIe links, and page-cache room for unpinned snapshots. One line per "
        "check: pass, warn, fail or skip. Exit code 0 when none failed, 1 otherwise.",
    )
    p.set_defaults(func=run_doctor)


def run_doctor(ctx: Context) -> int:
    checks = diagnose(ctx)
    failed = any(c.state == "fail" for c in checks)
    if ctx.json:
        render.emit_json({"ok": not failed, "checks": [c.to_json() for c in checks]}, ctx.out)
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            ctx.print(f"{c.state.upper():<4}  {c.name.ljust(width)}  {c.detail}")
            if c.hint and c.state in ("warn", "fail"):
                ctx.print(f"{'':<4}  {'':<{width}}  → {c.hint}")
        counts = {s: sum(c.state == s for c in checks) for s in STATES}
        ctx.print(
            f"{len(checks)} checks: {counts['pass']} passed, {counts['warn']} warned, "
            f"{counts['fail']} failed, {counts['skip']} skipped"
        )
    return exitcodes.ERROR if failed else exitcodes.OK


def diagnose(ctx: Context) -> list[Check]:
    """Every check, in the order an operator fixes things: reach thawd, then tune it."""
    from thaw.client import default_socket

    path = ctx.socket or default_socket()
    checks = [socket_check(path), group_check(path)]
    daemon = _ask_thawd(ctx)
    checks.append(daemon.check)
    checks.append(memlock_check(daemon.status))
    checks.append(vmm_check())
    checks.append(pcie_check())
    checks.append(page_cache_check(daemon.status, daemon.snapshots))
    return checks


# --- the socket and who may use it ------------------------------------------------------------


def socket_check(path: str) -> Check:
    from thaw.daemon import fdsocket
    from thawctl import sockets

    problem = sockets.problem(path)
    if problem is not None:
        return Check("socket", "fail", problem.text, problem.hint)
    st = os.stat(path)
    owner, group = _user(st.st_uid), _group(st.st_gid)
    detail = f"{path}: a socket, mode {stat.S_IMODE(st.st_mode):o}, owner {owner}, group {group}"
    fd_path = fdsocket.fd_socket_path(path)
    unusable = [p for p in (path, fd_path) if not os.access(p, os.W_OK)]
    if unusable:
        return Check(
            "socket",
            "fail",
            f"{detail}; uid {os.getuid()} may not connect to {', '.join(unusable)} "
            "(connecting needs write permission)",
            f"join group {group} (see the group check) or ask for access",
        )
    return Check("socket", "pass", detail + f", and {os.path.basename(fd_path)} beside it")


def group_check(path: str) -> Check:
    """Whether this user is in the socket's group, in this session (a new membership counts
    only after logging in again)."""
    try:
        st = os.stat(path)
    except OSError:
        return Check("group", "skip", f"no socket at {path}")
    uid, mode = os.getuid(), stat.S_IMODE(st.st_mode)
    group = _group(st.st_gid)
    user = _user(uid)
    if uid == 0:
        return Check("group", "pass", "root may connect to any socket")
    if st.st_uid == uid:
        return Check("group", "pass", f"{user} owns the socket")
    if mode & 0o002:
        return Check("group", "pass", f"the socket is open to every user (mode {mode:o})")
    if not mode & 0o020:
        return Check(
            "group",
            "fail",
            f"the socket (mode {mode:o}) admits its owner {_user(st.st_uid)} only",
            "set socket_group and socket_mode = 0660 in thawd's config",
        )
    if st.st_gid == os.getgid() or st.st_gid in os.getgroups():
        return Check("group", "pass", f"{user} is in {group}, the socket's group")
    if _listed_member(user, st.st_gid):
        return Check(
            "group",
            "warn",
            f"{user} is in {group} in the group database, but not in this login session",
            f"log in again (or run `newgrp {group}`)",
        )
    return Check(
        "group",
        "fail",
        f"{user} is not in {group}, the socket's group",
        f"`sudo usermod -aG {group} {user}`, then log in again",
    )


def _listed_member(user: str, gid: int) -> bool:
    try:
        if user in grp.getgrgid(gid).gr_mem:
            return True
        return pwd.getpwnam(user).pw_gid == gid
    except KeyError:
        return False


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- thawd ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Daemon:
    check: Check
    status: Any = None  # thaw.daemon.records.DaemonStatus when thawd answered
    snapshots: tuple[Any, ...] = ()


def _ask_thawd(ctx: Context) -> _Daemon:
    from thaw.errors import ThawError
    from thawctl import __version__

    try:
        with ctx.connect() as client:
            status = client.status()
            snapshots = tuple(client.list())
    except (ThawError, OSError) as e:
        _, hint = exitcodes.classify(e, "doctor")
        return _Daemon(Check("thawd", "fail", exitcodes.message(e, hint)))  # says what to do
    detail = (
        f"thawd {status.version} (api {status.api_version}), pid {status.pid}, "
        f"{status.pool_kind} pool, up {render.duration(status.uptime_s)}"
    )
    if status.version != __version__:
        check = Check(
            "thawd",
            "warn",
            f"{detail}; this thawctl is {__version__}",
            "install one version of thaw for both (restart thawd after upgrading)",
        )
    else:
        check = Check("thawd", "pass", detail)
    return _Daemon(check, status, snapshots)


def memlock_check(status: Any) -> Check:
    """thawd's RLIMIT_MEMLOCK (read from /proc/PID/limits) against its pinned budget: memfd
    pool buffers and warm mappings are mlocked, and what the limit refuses stays swappable."""
    if status is None:
        return Check("memlock", "skip", "needs thawd's budget: thawd did not answer")
    budget = status.pinned_budget
    limit = _memlock_limit(status.pid)
    locked = "" if status.memory_locked else "; thawd reports memory it could not lock"
    if limit is None:
        state = "pass" if status.memory_locked else "warn"
        return Check(
            "memlock",
            state,
            f"cannot read /proc/{status.pid}/limits here{locked or '; thawd locked its memory'}",
            UNIT_HINT,
        )
    shown = "unlimited" if limit < 0 else render.size(limit)
    detail = f"thawd's RLIMIT_MEMLOCK is {shown}, its pinned budget {render.size(budget)}"
    if limit < 0 or limit >= budget:
        return Check("memlock", "warn" if locked else "pass", detail + locked, UNIT_HINT)
    if status.pool_kind == "vmm":
        # The CUDA driver pins the VMM pool itself; only memfd fallbacks and warm mappings
        # are mlocked.
        return Check(
            "memlock",
            "warn",
            detail + " (the VMM pool is pinned by the driver; "
            "warm mappings are mlocked under this limit)" + locked,
            UNIT_HINT,
        )
    return Check(
        "memlock",
        "fail",
        detail + ": pinned snapshots beyond the limit stay swappable" + locked,
        UNIT_HINT,
    )


def _memlock_limit(pid: int) -> int | None:
    """The soft "Max locked memory" of process `pid` in bytes (-1: unlimited), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Max locked memory"):
            soft = line[len("Max locked memory") :].split()[0]
            return -1 if soft == "unlimited" else int(soft)
    return None


# --- GPUs -------------------------------------------------------------------------------------


def vmm_check() -> Check:
    """Whether this host can create shareable CUDA VMM host memory: thawd's pinned pool (what
    engines map without pinning anything themselves)."""
    from thaw.mem import cuda, vmm

    count = cuda.device_count()
    if count == 0:
        return Check("vmm", "skip", "no NVIDIA driver or no GPU visible: thawd uses its memfd pool")
    if vmm.supported(0):
        return Check("vmm", "pass", f"CUDA VMM host memory works ({count} GPU(s))")
    return Check(
        "vmm",
        "warn",
        "this host cannot create shareable CUDA VMM host memory: thawd falls back to a memfd "
        "pool, which each engine process pins itself",
        "a CUDA driver with host NUMA memory allocations (cuMemCreate on HOST_NUMA, CUDA 12.2 "
        "and later; docs/DAEMON.md, 'Pinned, VMM pool')",
    )


@dataclasses.dataclass(frozen=True)
class Link:
    device: str  # PCI address, or the GPU index from nvidia-smi
    generation: int | None
    max_generation: int | None
    width: int | None
    max_width: int | None


def pcie_check(
    root: str = PCI_DEVICES, nvidia_smi: Callable[[], list[Link]] | None = None
) -> Check:
    """The GPUs' PCIe links: a link narrower than it can be halves restores. An idle GPU trains
    its link down to a lower generation, so a generation below the maximum only gets a note."""
    links = sysfs_links(root)
    if not links:
        links = (nvidia_smi or _nvidia_smi_links)()
    if not links:
        return Check("pcie", "skip", "no NVIDIA GPU found (sysfs, nvidia-smi)")
    parts, narrow = [], []
    for link in links:
        text = f"{link.device} Gen{link.generation or '?'} x{link.width or '?'}"
        if link.max_width and link.width and link.width < link.max_width:
            narrow.append(link)
            text += f" (of x{link.max_width})"
        elif link.max_generation and link.generation and link.generation < link.max_generation:
            text += f" (Gen{link.max_generation} under load; idle links train down)"
        parts.append(text)
    if narrow:
        return Check(
            "pcie",
            "warn",
            "; ".join(parts),
            "a link below its width: reseat the GPU, check the slot/riser and BIOS lane "
            "settings (nvidia-smi -q -d PCIE)",
        )
    return Check("pcie", "pass", "; ".join(parts))


def sysfs_links(root: str = PCI_DEVICES) -> list[Link]:
    """NVIDIA display/3D controllers under `root` (the kernel's /sys/bus/pci/devices)."""
    links = []
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return []
    for address in devices:
        d = Path(root, address)
        if _read(d / "vendor") != NVIDIA_VENDOR or not _read(d / "class").startswith("0x03"):
            continue
        links.append(
            Link(
                address,
                _generation(_read(d / "current_link_speed")),
                _generation(_read(d / "max_link_speed")),
                _int(_read(d / "current_link_width")),
                _int(_read(d / "max_link_width")),
            )
        )
    return links


def _nvidia_smi_links() -> list[Link]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    fields = ",".join(
        f"pcie.link.{q}" for q in ("gen.current", "gen.max", "width.current", "width.max")
    )
    try:
        out = subprocess.run(
            [exe, f"--query-gpu=index,{fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    links = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5:
            links.append(Link(f"GPU {cells[0]}", *(_int(c) for c in cells[1:])))
    return links


def _generation(speed: str) -> int | None:
    """`32.0 GT/s PCIe` -> 5."""
    try:
        return GENERATIONS.get(float(speed.split()[0]))
    except (ValueError, IndexError):
        return None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# --- memory -----------------------------------------------------------------------------------


def page_cache_check(status: Any, snapshots: tuple[Any, ...]) -> Check:
    """Room in the page cache (MemAvailable) for the snapshots that live there: the warm ones
    must fit, or restores read them from disk again; cold ones fit or not."""
    if status is None:
        return Check("page cache", "skip", "needs thawd's snapshots: thawd did not answer")
    available = status.host_memory_available
    warm = sum(r.size_bytes for r in snapshots if r.wanted_tier == "warm")
    unpinned = sum(r.size_bytes for r in snapshots if r.wanted_tier != "pinned")
    detail = (
        f"MemAvailable {render.size(available)}; warm snapshots {render.size(warm)}, all "
        f"unpinned ones {render.size(unpinned)}"
    )
    if warm > available:
        return Check(
            "page cache",
            "warn",
            detail + ": the warm ones do not fit, restores will read them from disk",
            "pin the busiest ones, warm fewer, or add memory",
        )
    return Check("page cache", "pass", detail)
