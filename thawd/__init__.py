"""thawd: the host daemon that keeps thaw snapshots pinned and serves restores (docs/DAEMON.md)."""

__version__ = "0.1.0"
API_VERSION = "thaw.v1"
