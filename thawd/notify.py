"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (systemd's Type=notify), and
the watchdog's ping."""

from __future__ import annotations

import asyncio
import os
import socket


def notify(*lines: str) -> bool:
    """Send "READY=1", "STOPPING=1", "STATUS=..." to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace: leading NUL instead of "@"
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec= (WATCHDOG_USEC), as
    sd_watchdog_enabled(3) advises; None when no watchdog is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog(period: float) -> None:
    """Ping from the event loop itself: a loop blocked for WatchdogSec misses its pings, and
    systemd kills and restarts the daemon (a thread would ping on through the hang)."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(period)
