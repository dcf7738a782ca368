"""Text for people: sizes, rates, durations, ages and plain aligned tables.

The CLI and the dashboard share these so a number reads the same everywhere.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

# Sizes use binary units (GiB): memory budgets are configured in them. Rates use SI GB/s:
# that is how PCIe links and DESIGN.md's measurements are quoted.
_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in _UNITS:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def rate(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    return f"{bytes_per_s / 1e9:.2f} GB/s"


def duration(seconds: float | None) -> str:
    """`3d 4h`, `2h 05m`, `4m 07s`, `12.3s`."""
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s:02d}s"


def ago(unix: float | None, now: float) -> str:
    """How long before `now` the moment `unix` was: `5s ago`; `never` for None."""
    if unix is None:
        return "never"
    return duration(max(0.0, now - unix)) + " ago"


def percent(part: int | None, whole: int | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100.0 * part / whole:.0f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; `right` lists the indexes aligned right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def emit_json(doc: Any, out: TextIO | None = None) -> None:
    """One JSON document on stdout, keys sorted so diffs of scripted runs stay small."""
    out = out or sys.stdout
    out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
