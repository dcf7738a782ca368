"""`thawctl status`: the daemon's version, budgets, memory and GPUs."""

from __future__ import annotations

import argparse
from typing import Any

from thawctl import exitcodes, render, schema
from thawctl.context import Context


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        parents=[parents["json"], parents["socket"]],
        help="show thawd's version, budgets, host memory and GPUs",
        description="Ask thawd how it is: version, uptime, pool, pinned and warm budgets, host "
        "memory, GPUs and restore totals. Exit code 3 when no daemon answers.",
    )
    p.set_defaults(func=run_status)


def run_status(ctx: Context) -> int:
    with ctx.connect() as client:
        s = client.status()
    if ctx.json:
        render.emit_json(schema.status(s), ctx.out)
        return exitcodes.OK
    for line in lines(s):
        ctx.print(line)
    return exitcodes.OK


def lines(s: Any) -> list[str]:
    gpus = [
        f"{g.index}: {g.name}, {render.size(g.memory_total)}"
        + (f", {schema.known(g.link)}" if schema.known(g.link) else "")
        for g in s.gpus
    ]
    locked = "memory locked" if s.memory_locked else "NOT memory locked: raise LimitMEMLOCK"
    rows = [
        (
            "thawd",
            f"{s.version} (api {s.api_version}), pid {s.pid}, up {render.duration(s.uptime_s)}",
        ),
        ("socket", s.socket),
        ("pool", f"{s.pool_kind}, {locked}"),
        (
            "pinned",
            f"{render.size(s.pinned_used)} of {render.size(s.pinned_budget)} "
            f"({render.percent(s.pinned_used, s.pinned_budget)})",
        ),
        (
            "warm",
            f"{render.size(s.warm_used)} of {render.size(s.warm_budget)} "
            f"({render.percent(s.warm_used, s.warm_budget)})",
        ),
        (
            "host memory",
            f"{render.size(s.host_memory_available)} available of "
            f"{render.size(s.host_memory_total)}",
        ),
        ("gpus", "; ".join(gpus) if gpus else "none (CPU restores)"),
        ("snapshots", f"{s.snapshots} registered"),
        (
            "restores",
            f"{s.restores_total} total ({render.size(s.bytes_restored_total)}), "
            f"{s.active_restores} active; {s.active_freezes} freezes active",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]
