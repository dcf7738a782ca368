"""`thawctl demo`: freeze the embedded tiny Llama, restore it into a fresh model, compare.

No daemon, no download. Exit code 0 iff the restored model's greedy output is identical.
"""

from __future__ import annotations

import argparse
from typing import Any

from thawctl import exitcodes, render, schema
from thawctl.context import Context


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        parents=[parents["json"]],
        help="freeze and restore a tiny Llama, check the outputs are identical",
        description="Freeze the embedded tiny Llama (random weights, no download) to a temporary "
        "snapshot, restore it into a model with other weights, and compare greedy outputs. "
        "Exit code 0 iff they are bit-identical.",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dir", help="directory for the temporary snapshot (default: $TMPDIR)")
    p.set_defaults(func=run_demo)


def run_demo(ctx: Context) -> int:
    from thaw.demo import roundtrip

    result = roundtrip.run(device=ctx.args.device, directory=ctx.args.dir)
    if ctx.json:
        render.emit_json(to_json(result), ctx.out)
    else:
        ctx.print(roundtrip.report(result))
    if not result.identical:
        ctx.err.write(
            "thawctl: error: the restored model's output differs from the original; "
            "this is a bug in thaw: please report it with the output above\n"
        )
        return exitcodes.ERROR
    return exitcodes.OK


def to_json(result: Any) -> dict[str, Any]:
    return {
        "device": result.device,
        "snapshot_bytes": result.snapshot_bytes,
        "freeze": schema.transfer(result.freeze),
        "restore": schema.transfer(result.restore),
        "original_tokens": list(result.original),
        "before_restore_tokens": list(result.before_restore),
        "restored_tokens": list(result.restored),
        "identical": result.identical,
    }
