"""`thawctl events`: thawd's events as they happen, one line each (or JSON lines), until Ctrl-C.

The events are the Watch stream's (the one `thawctl top` shows); its periodic metrics are not
printed. Only events from the moment of connecting: thawd keeps no history of them.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from thawctl import exitcodes
from thawctl.context import Context

# The kinds thawd emits (proto/thaw/v1/thawd.proto, Event.kind); --kind takes others too, so
# that a newer thawd's kinds can be filtered by an older thawctl.
KINDS = (
    "registered",
    "unregistered",
    "pinned",
    "unpinned",
    "warmed",
    "demoted",
    "restore_started",
    "restore_finished",
    "restore_failed",
    "freeze_started",
    "freeze_committed",
    "freeze_written",
    "freeze_failed",
    "pin_failed",
    "verified",
    "verify_failed",
    "stopping",
)
# Metrics are not printed: asking for them rarely keeps the stream to the events.
METRICS_PERIOD_S = 3600.0


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "events",
        parents=[parents["socket"]],
        help="print thawd's events as they happen, until Ctrl-C",
        description="Print thawd's events (registered, pinned, restore_finished, pin_failed, "
        "...) as they happen, one line each: local time, kind, snapshot, message. With "
        "--json, one JSON object a line. Runs until Ctrl-C (exit 0), --count events, or "
        "thawd going away (exit 3).",
    )
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KIND",
        help="only events of this kind (repeatable, or comma-separated): " + ", ".join(KINDS),
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object a line (schema: docs/THAWCTL.md)"
    )
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.set_defaults(func=run_events)


def run_events(ctx: Context) -> int:
    from thaw.daemon.records import Event

    args = ctx.args
    kinds = {k.strip() for text in args.kind for k in text.split(",") if k.strip()}
    if args.count is not None and args.count < 1:
        raise exitcodes.CommandError("--count must be at least 1", exitcodes.USAGE)
    from thaw.errors import DaemonUnavailable

    printed = 0
    stopping = False
    try:
        with ctx.connect() as client:
            try:
                for item in client.watch(METRICS_PERIOD_S):
                    if not isinstance(item, Event):
                        continue
                    stopping = stopping or item.kind == "stopping"
                    if kinds and item.kind not in kinds:
                        continue
                    ctx.print(json.dumps(to_json(item), sort_keys=True) if args.json
                              else line(item))  # fmt: skip
                    ctx.out.flush()  # a reader at the other end of a pipe sees each at once
                    printed += 1
                    if args.count is not None and printed >= args.count:
                        return exitcodes.OK
            except DaemonUnavailable:
                # After its "stopping" event, a stopping thawd may close the connection
                # before the stream's end reaches us: the same ending, said the same way.
                if not stopping:
                    raise
            socket = client.socket
    except KeyboardInterrupt:
        return exitcodes.OK  # the documented way to stop it
    raise DaemonUnavailable(f"thawd at {socket} ended the event stream (it is stopping)")


def line(event: Any) -> str:
    """`2026-12-01 10:04:40.123  pinned  llama-8b  16.00 GiB in 0.31 s`."""
    from thawctl.schema import known

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time))
    millis = int((event.time % 1) * 1000)
    subject = known(event.snapshot) or "-"
    text = f"{when}.{millis:03d}  {event.kind:<16}  {subject}"
    if event.message:
        text += f"  {event.message}"
    return text


def to_json(event: Any) -> dict[str, Any]:
    from thawctl.schema import known

    return {
        "time_unix": event.time,
        "kind": event.kind,
        "snapshot": known(event.snapshot),
        "message": event.message,
        "bytes": event.bytes,
        "duration_s": event.duration_s,
    }
