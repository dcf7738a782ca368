"""thawd's log lines: one handler on stdout, its level set at start and on reload."""

from __future__ import annotations

import logging
import sys


def configure(level: str) -> None:
    """Log at `level` (debug, info, warning, error) to stdout; called again on reload."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)  # journald timestamps each line
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
