"""The `thawctl` command line: the parser and the dispatch.

Each command group lives in its own module with an `add_parsers(subparsers, common)` function
that adds its subcommands and sets `func` to a `run(ctx) -> int` (ctx: thawctl/context.py).
Commands raise exceptions; `main` turns them into one line on stderr and the exit code of
exitcodes.py (context.report, the one place errors become exit codes). Heavy imports
(torch through thaw, grpc, textual) happen inside the commands, so `--help` and completion
stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, TextIO

from thawctl import exitcodes
from thawctl.context import DEFAULT_TIMEOUT_S, PROG, Context, report

DESCRIPTION = """\
The operator's tool for thawd, the thaw host daemon: register, pin and inspect model
snapshots, freeze models into snapshots, measure restore throughput, and watch the daemon
live with `thawctl top`."""


class Parser(argparse.ArgumentParser):
    """argparse with thawctl's one-line error format (exit code 2, usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            exitcodes.USAGE,
            f"{PROG}: error: {message}; see `{self.prog} --help`\n",
        )


def common_parents() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers that subcommands share: --json, --socket."""
    json_parent = argparse.ArgumentParser(add_help=False)
    json_parent.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (schemas: docs/THAWCTL.md)",
    )
    socket_parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --socket after the subcommand overrides one before it, and none leaves the
    # global one in place.
    socket_parent.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="thawd's socket"
    )
    return {"json": json_parent, "socket": socket_parent}


def build_parser() -> Parser:
    from thawctl import (
        bench,
        completion,
        demo,
        doctor,
        events,
        freeze,
        sessions,
        snapshots,
        status,
        top,
    )
    from thawctl.serve import command as serve

    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=exitcodes.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get("THAW_SOCKET") or None,
        help="thawd's socket (default: $THAW_SOCKET, /run/thawd/thawd.sock, "
        "$XDG_RUNTIME_DIR/thawd/thawd.sock)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=DEFAULT_TIMEOUT_S,
        help=f"wait at most this long for thawd to connect and answer a short call (default "
        f"{DEFAULT_TIMEOUT_S:g}; pin, verify and freeze progress have no deadline)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parents = common_parents()
    for module in (status, doctor, snapshots, sessions, events, freeze, bench, demo, top,
                   serve, completion):  # fmt: skip
        module.add_parsers(sub, parents)
    return parser


def _seconds(text: str) -> float:
    """argparse type of --timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _version() -> str:
    from thawctl import __version__

    return __version__


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one thawctl command and return its exit code; never raises (--help and --version
    print and return 0, usage errors print one line and return 2)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else exitcodes.USAGE
    ctx = Context(args, out, err, parser)
    try:
        return int(args.func(ctx))
    except KeyboardInterrupt as e:
        notes = "".join(f"; {note}" for note in getattr(e, "__notes__", ()))
        err.write(f"\n{PROG}: interrupted{notes}\n")
        return exitcodes.INTERRUPTED
    except BrokenPipeError:
        # `thawctl ls | head`: the reader left; say nothing more to it.
        _silence_stdout()
        return exitcodes.ERROR
    except Exception as e:
        return report(e, err, ctx.command)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
