"""What a thawctl command gets (`Context`: its arguments, where to write, how to reach thawd)
and the one place an exception becomes a line on stderr and an exit code (`report`). The
command modules import this, never thawctl/cli.py, which imports them."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TextIO

from thawctl import exitcodes

PROG = "thawctl"
# Seconds to wait for thawd to connect and to answer a short call. A healthy thawd answers in
# milliseconds; a hung one should not hold a shell for the client library's default 30 s.
# Pin, verify and freeze progress are long by nature and have no deadline.
DEFAULT_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Context:
    """What a command gets: its arguments and where to write."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    parser: argparse.ArgumentParser | None = None  # the whole command line's (completion)

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
