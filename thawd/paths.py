"""Opening a caller's path with the caller's rights, through file descriptors only.

thawd runs as its own uid and serves many: a path a client names must be opened as that client
could open it, and the file thawd then uses must be the file it checked. A check by name
followed by an open by name is a race any client can win (swap a directory for a symlink in
between), so a path is walked one component at a time from "/":

- each component is opened with O_PATH | O_NOFOLLOW relative to the directory fd before it,
  after the caller's search permission on that directory was checked on the fd (fstat and
  its POSIX ACL: the directory actually opened, not a name that can change);
- a symlink is read relative to the directory that holds it and its target walked the same
  way (at most 40, as the kernel allows), so symlinked snapshot directories keep working and
  no symlink leads anywhere its caller could not go itself;
- the last component must be a regular file (checked on the O_PATH fd: a FIFO or a device
  is refused without being opened, so nothing blocks) that the caller may read; it is then
  opened O_RDONLY | O_NOFOLLOW | O_NONBLOCK relative to its directory and must be the same
  inode (dev, ino) as the one checked.

From then on the fd is the snapshot: nothing is reopened by name. Every function here blocks
(a path may be on a slow or hung filesystem): the daemon calls them on worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import struct
from collections import deque

from thaw.errors import InvalidRequest, PermissionDenied
from thawd.security import Peer

MAX_SYMLINKS = 40
READ, WRITE, SEARCH = 4, 2, 1  # rwx bits, as in a mode's "other" triplet and in ACL entries

# POSIX ACL xattr ("system.posix_acl_access"): a u32 version, then (u16 tag, u16 perm, u32 id).
_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclasses.dataclass(frozen=True)
class Opened:
    """A file or directory opened for a caller: the fd (the caller closes it), its stat, and
    the path it was reached by with every symlink resolved (for messages and the registry)."""

    fd: int
    st: os.stat_result
    path: str


def open_file(peer: Peer, path: str) -> Opened:
    """`path` opened read-only as a regular file that `peer` may read; its fd is ours to use."""
    found = _walk(peer, path)
    try:
        if stat.S_ISDIR(found.st.st_mode):
            raise InvalidRequest(f"{path}: is a directory, not a snapshot file")
        if not stat.S_ISREG(found.st.st_mode):
            raise InvalidRequest(
                f"{path}: not a regular file (a FIFO, socket or device); "
                "thawd opens regular files only"
            )
        if not may(peer, found.st, READ, found.fd):
            raise PermissionDenied(
                f"uid {peer.uid} may not read {path}: thawd only uses "
                "files its caller could read itself"
            )
        # The O_PATH fd's magic link reopens that very inode: no name is looked up again.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(f"/proc/self/fd/{found.fd}", flags)
        except PermissionError:
            raise PermissionDenied(
                f"thawd (uid {os.getuid()}) cannot read {path}: make it "
                "readable by the thawd user or group"
            ) from None
        return Opened(fd, os.fstat(fd), found.path)
    finally:
        os.close(found.fd)


def open_directory(peer: Peer, path: str) -> Opened:
    """The directory `path`, as an O_PATH fd, if `peer` may create files in it (w and x)."""
    found = _walk(peer, path)
    if not stat.S_ISDIR(found.st.st_mode):
        os.close(found.fd)
        raise InvalidRequest(f"{path}: not a directory")
    if not may(peer, found.st, WRITE | SEARCH, found.fd):
        os.close(found.fd)
        raise PermissionDenied(f"uid {peer.uid} may not create files in {found.path}")
    return found


def may(peer: Peer, st: os.stat_result, want: int, fd: int) -> bool:
    """Whether `peer` has the `want` bits (READ | WRITE | SEARCH) on the file open as `fd`,
    as the kernel would decide: owner, then named users, then groups, then others, with the
    POSIX ACL where there is one. Root may do anything (CAP_DAC_OVERRIDE)."""
    if peer.uid == 0:
        return True
    acl = _acl(fd)
    mode = st.st_mode
    if st.st_uid == peer.uid:
        return (mode >> 6) & want == want
    if acl is None:
        bits = (mode >> 3) & 7 if st.st_gid in peer.groups else mode & 7
        return bits & want == want
    mask = next((perm for tag, perm, _ in acl if tag == _MASK), 7)
    for tag, perm, ident in acl:
        if tag == _USER and ident == peer.uid:
            return perm & mask & want == want
    matched = False
    for tag, perm, ident in acl:
        member = (tag == _GROUP_OBJ and st.st_gid in peer.groups) or (
            tag == _GROUP and ident in peer.groups
        )
        if member:
            matched = True
            if perm & mask & want == want:
                return True
    if matched:
        return False
    other = next((perm for tag, perm, _ in acl if tag == _OTHER), mode & 7)
    return other & want == want


def _acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The access ACL of the file open as `fd` (O_PATH fds too), None when it has none."""
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOENT):
            return None
        raise
    if len(raw) < _ACL_HEADER.size or (len(raw) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        return []  # malformed: no entry grants anything
    body = raw[_ACL_HEADER.size :]
    return [_ACL_ENTRY.unpack_from(body, i) for i in range(0, len(body), _ACL_ENTRY.size)]


def _walk(peer: Peer, path: str) -> Opened:
    """Resolve `path` for `peer`: an O_PATH fd of what it names (the caller closes it), its
    stat and its resolved path. Every directory on the way was searchable by `peer`."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidRequest(f"snapshot path {path!r} must be absolute")
    if "\0" in path or len(path) > 4096:
        raise InvalidRequest("snapshot path must be at most 4096 characters, without NUL")
    todo: deque[str] = deque(c for c in path.split("/") if c not in ("", "."))
    stack: list[tuple[int, str]] = [(_root(), "")]  # (directory fd, its name), "/" first
    links = 0
    try:
        while todo:
            name = todo.popleft()
            directory = stack[-1][0]
            if not may(peer, os.fstat(directory), SEARCH, directory):
                raise PermissionDenied(
                    f"uid {peer.uid} may not search {_join(stack)} (on the way to {path})"
                )
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            fd = _lookup(directory, name, path)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                stack.append((fd, name))
                continue
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise InvalidRequest(f"{path}: too many levels of symbolic links")
                target = os.readlink(name, dir_fd=directory)
                if target.startswith("/"):
                    _close(stack[1:])
                    del stack[1:]
                todo.extendleft(reversed([c for c in target.split("/") if c not in ("", ".")]))
                continue
            if todo:
                os.close(fd)
                raise InvalidRequest(f"{path}: {_join([*stack, (-1, name)])} is not a directory")
            resolved = _join([*stack, (fd, name)])
            _close(stack)
            return Opened(fd, st, resolved)
        top = stack.pop()
        resolved = _join([*stack, top])
        _close(stack)
        return Opened(top[0], os.fstat(top[0]), resolved)
    except BaseException:
        _close(stack)
        raise


def _root() -> int:
    return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _lookup(directory: int, name: str, path: str) -> int:
    """`name` in `directory` as an O_PATH fd, never following a symlink (it opens the link)."""
    try:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such file or directory") from None
    except PermissionError:
        raise PermissionDenied(
            f"thawd (uid {os.getuid()}) cannot reach {path}: make its "
            "directories searchable by the thawd user"
        ) from None
    except NotADirectoryError:
        raise InvalidRequest(f"{path}: a component is not a directory") from None


def _join(stack: list[tuple[int, str]]) -> str:
    return "/" + "/".join(name for _, name in stack if name)


def _close(stack: list[tuple[int, str]]) -> None:
    for fd, _ in stack:
        os.close(fd)
