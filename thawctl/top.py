"""`thawctl top`: the live dashboard of thawd (thawctl/tui)."""

from __future__ import annotations

import argparse
from typing import Any

from thawctl import exitcodes
from thawctl.context import Context


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "top",
        parents=[parents["socket"]],
        help="live dashboard: budgets, GPUs, snapshots, restore throughput, events",
        description="A live dashboard of thawd (Textual). Keys: p pin, w warm, u unpin (asks "
        "first while in use), v verify (by thawd, where the bytes are), d remove (asks first), "
        "/ filter, s sort, S sessions, P the serve pool (--serve), j/k or arrows select, "
        "Home/End, ? help, q quit. It keeps running while the daemon restarts and shows "
        "'reconnecting' meanwhile.",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="metrics period asked of the daemon (default 1 s)",
    )
    p.add_argument(
        "--serve",
        metavar="SOCKET",
        default="",
        help="a `thawctl serve` admin socket: key P shows its pool (slots, model per slot, "
        "queue depth, swaps/min)",
    )
    p.set_defaults(func=run_top)


def run_top(ctx: Context) -> int:
    from thawctl.tui.app import ThawTop
    from thawctl.tui.source import DaemonSource

    if ctx.args.interval <= 0:
        raise exitcodes.CommandError("--interval must be positive", exitcodes.USAGE)
    source = DaemonSource(ctx.socket, ctx.args.interval, timeout_s=ctx.timeout)
    app = ThawTop(source, interval_s=ctx.args.interval, serve_socket=ctx.args.serve)
    app.run()
    return exitcodes.OK
