"""Who is calling and what they may do: peer credentials, the allow-list, tokens, names.

gRPC's Python server exposes neither the connection's fd nor SO_PEERCRED, and its
LocalServerCredentials(UDS) checks nothing (grpc/grpc#15511, #28755). So credentials are
taken where the kernel gives them: on the fd socket. A client authenticates there once,
gets a random token bound to that connection's (pid, uid, gid, groups), and sends the token
in the metadata of every gRPC call; the token dies with the connection. Paths are opened with
the caller's rights in thawd/paths.py.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import secrets

from thaw.errors import InvalidRequest, PermissionDenied

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
MAX_LABELS = 32
MAX_LABEL_VALUE = 256


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name[:64]) + ("..." if isinstance(name, str) and len(name) > 64 else "")
        raise InvalidRequest(
            f"invalid snapshot name {shown}: use 1-128 characters [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"{len(labels)} labels; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise InvalidRequest(f"invalid label key {key[:64]!r}: use [A-Za-z0-9._/-], at most 64")
        if len(value) > MAX_LABEL_VALUE or any(ord(c) < 32 for c in value):
            raise InvalidRequest(f"invalid value for label {key!r}: printable, at most 256")
    return dict(labels)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A caller as the kernel identified it on the fd socket."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def from_credentials(cls, pid: int, uid: int, gid: int) -> Peer:
        return cls(pid, uid, gid, frozenset({gid}) | _supplementary_groups(pid))


def _supplementary_groups(pid: int) -> frozenset[int]:
    # Read at authentication time; a process that changes its groups re-authenticates.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


@dataclasses.dataclass(frozen=True)
class AllowList:
    """Default: the daemon's own uid, root, and members of the socket's group."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def build(cls, uids: tuple[int, ...], gids: tuple[int, ...], socket_gid: int) -> AllowList:
        return cls(frozenset({0, os.getuid(), *uids}), frozenset({socket_gid, *gids}))

    def check(self, peer: Peer) -> None:
        if peer.uid in self.uids or peer.groups & self.gids:
            return
        raise PermissionDenied(
            f"uid {peer.uid} (pid {peer.pid}) may not use thawd: add it to allow_uids, or one "
            "of its groups to allow_gids or the socket group, in the thawd config"
        )


def resolve_group(name: str, key: str = "socket_group") -> int:
    """A group's gid from its name or number ("" = the daemon's own group); `key` names the
    config key in the error."""
    if not name:
        return os.getgid()
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidRequest(f"{key} {name!r} does not exist") from None


class Tokens:
    """Bearer tokens issued on the fd socket, valid while the issuing connection is open."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def issue(self, peer: Peer) -> str:
        token = secrets.token_hex(24)
        self._peers[token] = peer
        return token

    def lookup(self, token: str) -> Peer | None:
        return self._peers.get(token)

    def revoke(self, token: str) -> None:
        self._peers.pop(token, None)
