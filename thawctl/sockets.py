"""What is wrong with a path given as thawd's socket, when no thawd answers on it.

The client library connects to thawd's fd socket first (`X.fd.sock` beside `X.sock`), so its
error names that derived path. The operator gave `X.sock`: this module looks at that path
(missing, not a socket, nobody listening, no permission, a socket of some other program) and
says what it found, in the words of the path the operator typed. `thawctl doctor` shows the
same findings.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat

from thaw.daemon import fdsocket

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
NOT_THAWD = (
    "point --socket or $THAW_SOCKET at thawd's socket (`socket` in its config; "
    "`systemctl status thawd` shows the running one)"
)
START = "start it with `systemctl start thawd` (or `thawd --config FILE`)"


@dataclasses.dataclass(frozen=True)
class Problem:
    text: str  # what is wrong with the path
    hint: str  # what to do


def problem(path: str) -> Problem | None:
    """What keeps `path` from being a live thawd socket, or None where it looks like one
    (a socket that accepts connections, with thawd's fd socket beside it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            return Problem(f"{path} does not exist (nor does its directory {parent})", START)
        return Problem(f"{path} does not exist", START)
    except PermissionError:
        return Problem(
            f"{path} cannot be reached: a directory on the way denies uid {os.getuid()} "
            "search permission",
            "check the directories' modes, or join thawd's socket group",
        )
    except OSError as e:
        return Problem(f"{path}: {e.strerror}", NOT_THAWD)
    if not stat.S_ISSOCK(st.st_mode):
        kind = next((word for test, word in _KINDS if test(st.st_mode)), "not a socket")
        return Problem(f"{path} is {kind}, not a socket", NOT_THAWD)
    refused = _connect_error(path)
    if refused == errno.ECONNREFUSED:
        return Problem(
            f"{path} is a socket nobody listens on (left behind by a thawd that stopped?)", START
        )
    if refused in (errno.EACCES, errno.EPERM):
        return Problem(
            f"uid {os.getuid()} may not connect to {path} (mode {stat.S_IMODE(st.st_mode):o})",
            "join thawd's socket group (socket_group in its config) or ask for allow_uids",
        )
    if refused == errno.EPROTOTYPE:  # a datagram or seqpacket socket: not gRPC's
        return Problem(f"{path} is a socket of another kind than thawd's gRPC socket", NOT_THAWD)
    if refused is not None:
        return Problem(f"cannot connect to {path}: {os.strerror(refused)}", NOT_THAWD)
    fd_path = fdsocket.fd_socket_path(path)
    if not os.path.exists(fd_path):
        return Problem(
            f"{path} accepts connections but is not thawd's: thawd keeps its fd socket "
            f"{os.path.basename(fd_path)} beside it, and there is none",
            NOT_THAWD,
        )
    return None


def _connect_error(path: str) -> int | None:
    """The errno of a stream connection to `path`, or None when it connects (then closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        # A listener whose backlog is full makes connect() wait; a second is plenty here.
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except TimeoutError:
            return None  # a listener, only a busy one
        except OSError as e:
            return e.errno
    return None
