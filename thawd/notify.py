"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (systemd's Type=notify)."""

from __future__ import annotations

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
