"""The `thawctl` command line: the parser, the dispatch, and the one place errors become exit codes.

Each command group lives in its own module with an `add_parsers(subparsers, common)` function
that adds its subcommands and sets `func` to a `run(ctx) -> int`. Commands raise exceptions;
`main` turns them into one line on stderr and the exit code of exitcodes.py. Heavy imports
(torch through thaw, grpc, textual) happen inside the commands, so `--help` and completion
stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NoReturn, TextIO

from thawctl import exitcodes

PROG = "thawctl"
# Seconds to wait for thawd to connect and to answer a short call. A healthy thawd answers in
# milliseconds; a hung one should not hold a shell for the client library's default 30 s.
# Pin, verify and freeze progress are long by nature and have no deadline.
DEFAULT_TIMEOUT_S = 10.0

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


@dataclasses.dataclass
class Context:
    """What a command gets: its arguments and where to write."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def socket(self) -> str | None:
        return getattr(self.args, "socket", None) or None

    @property
    def timeout(self) -> float:
        return float(getattr(self.args, "timeout", DEFAULT_TIMEOUT_S))

    @property
    def command(self) -> str:
        return str(getattr(self.args, "command", "") or "COMMAND")

    def connect(self) -> Any:
        """A client of thawd on --socket (or $THAW_SOCKET and the default paths), waiting
        --timeout seconds at most for it to connect and for each short call; a socket that
        cannot be thawd's says what is wrong with that path (thawctl/sockets.py)."""
        import thaw
        from thaw.client import default_socket
        from thaw.errors import DaemonUnavailable

        try:
            return thaw.connect(self.socket, timeout=self.timeout)
        except DaemonUnavailable as e:
            from thawctl import sockets

            path = self.socket or default_socket()
            problem = sockets.problem(path)
            if problem is None:
                raise
            raise DaemonUnavailable(f"no thawd at {path}: {problem.text}; {problem.hint}") from e

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def warn(self, text: str) -> None:
        self.err.write(f"{PROG}: {text}\n")


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
        snapshots,
        status,
        top,
    )

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
    for module in (status, doctor, snapshots, events, freeze, bench, demo, top, completion):
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
    ctx = Context(args, out, err)
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


def report(exc: BaseException, err: TextIO, command: str = "") -> int:
    """Print the one-line error for `exc` on `err`; return its exit code. Notes added to the
    exception (`add_note`: what the command did before it failed) end the line."""
    from thaw.errors import ThawError

    code, hint = exitcodes.classify(exc, command)
    missing = exitcodes.missing_module(exc, command)
    if missing:
        text = missing
    elif not isinstance(exc, (ThawError, OSError, exitcodes.CommandError)):
        if os.environ.get("THAWCTL_DEBUG"):
            import traceback

            traceback.print_exception(exc, file=err)
        hint = (
            "THAWCTL_DEBUG=1 prints the traceback; if it is not an installation problem, "
            "please report it"
        )
        text = f"unexpected {type(exc).__name__}: {exitcodes.message(exc, '')}; {hint}"
    else:
        text = exitcodes.message(exc, hint)
    for note in getattr(exc, "__notes__", ()):
        text += "; " + " ".join(str(note).split())
    err.write(f"{PROG}: error: {text}\n")
    err.flush()
    return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
