"""`thawctl sessions`: who restores or freezes what now, and the latest restores' rates."""

from __future__ import annotations

import argparse
from typing import Any

from thawctl import exitcodes, render, schema
from thawctl.context import Context

HEADERS = ("STATE", "KIND", "SNAPSHOT", "PID", "UID", "SIZE", "TIME", "RATE", "DELIVERY")


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sessions",
        parents=[parents["json"], parents["socket"]],
        help="list open restore and freeze sessions and the latest restores",
        description="Every open restore and freeze session of thawd (any uid's: process id, "
        "uid, snapshot, bytes, age), then the latest ended restores (thawd keeps 64) with "
        "what the client copied and how fast. `thawctl top` shows the same (key S).",
    )
    p.set_defaults(func=run_sessions)


def run_sessions(ctx: Context) -> int:
    with ctx.connect() as client:
        sessions = client.sessions()
    if ctx.json:
        render.emit_json([schema.session(s) for s in sessions], ctx.out)
        return exitcodes.OK
    ctx.print(render.table(HEADERS, [row(s) for s in sessions], right=(3, 4, 5, 6, 7)))
    return exitcodes.OK


def row(s: Any) -> tuple[str, ...]:
    """One session as the table (and `thawctl top`'s sessions view) shows it."""
    state = "open" if s.open else ("done" if s.ok else "failed")
    when = render.duration(s.seconds) if s.open else f"{s.seconds * 1e3:.1f} ms"
    rate = schema.known(s.gbps)
    shown_rate = f"{rate:.2f} GB/s" if rate is not None else ""
    delivery = str(schema.known(s.delivery) or "")
    return (state, s.kind, s.snapshot, str(s.pid), str(s.uid), render.size(s.bytes), when,
            shown_rate, delivery)  # fmt: skip
