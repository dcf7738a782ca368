"""The `[s3]` table of thawd.toml, object URIs, and which of them thawd may touch."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from thaw.errors import InvalidRequest, PermissionDenied

SCHEME = "s3://"
# S3's own bounds: bucket names are 3 to 63 characters, keys at most 1024 bytes.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
MAX_KEY = 1024


def is_uri(path: str) -> bool:
    return path.startswith(SCHEME)


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """One object: `s3://bucket/key`."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> ObjectRef:
        bucket, _, key = uri.removeprefix(SCHEME).partition("/")
        if not is_uri(uri) or not _BUCKET.fullmatch(bucket) or not key:
            raise InvalidRequest(f"{uri!r} is not an object URI: write s3://BUCKET/KEY")
        # Keys are opaque to S3 but these would make a URI that names two things (an allow
        # prefix "b/models/" must not admit "b/models/../secrets"), or a message unreadable.
        parts = key.split("/")
        if (len(key.encode()) > MAX_KEY or any(p in (".", "..") for p in parts)
                or any(ord(c) < 32 or c == "\x7f" for c in key)):  # fmt: skip
            raise InvalidRequest(f"{uri!r}: the key must be at most {MAX_KEY} bytes of printable "
                                 "characters, without . or .. components")  # fmt: skip
        return cls(bucket, key)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def basename(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class S3Config:
    """thawd.toml's `[s3]` table (docs/DAEMON.md, "Object storage")."""

    # URI prefixes thawd may read ("s3://bucket/" for a whole bucket); empty: S3 off. Freezes
    # write only under `allow_write` (empty: none): a node that serves snapshots need not be
    # able to overwrite the fleet's store on any client's word.
    allow: tuple[str, ...] = ()
    allow_write: tuple[str, ...] = ()
    endpoint_url: str = ""  # "" = AWS; http(s)://host:port for an S3-compatible store
    region: str = ""  # "" = the credential chain's (AWS_REGION, the profile)
    # A node's local copies of pinned objects, so a restart re-pins from disk; "" = none.
    cache_dir: str = ""
    cache_bytes: int = 0
    # Parallel ranged GETs (and upload parts) per snapshot, and each one's size: 16 ranges of
    # 64 MiB keep a 25 Gb/s link busy where one stream stops at a few hundred MB/s.
    connections: int = 16
    part_size: int = 64 << 20
    # Attempts per request (botocore's standard retry mode: transient errors, throttling,
    # connection resets), and the connect/read timeout of each.
    max_attempts: int = 4
    timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.allow)

    def check(self, ref: ObjectRef, action: str) -> None:
        """PermissionDenied unless `ref` lies under a prefix of `allow` ("read"), or of
        `allow_write` too ("write")."""
        if not self.enabled:
            raise PermissionDenied(
                f"{ref.uri}: object storage is off on this thawd (its operator enables it "
                "with an [s3] allow list in thawd.toml)"
            )
        if not any(ref.uri.startswith(prefix) for prefix in self.allow):
            raise PermissionDenied(f"{ref.uri}: thawd may not {action} it: its [s3] allow list "
                                   f"admits only {', '.join(self.allow)}")  # fmt: skip
        if action == "write" and not any(ref.uri.startswith(p) for p in self.allow_write):
            raise PermissionDenied(
                f"{ref.uri}: thawd may not write it: its [s3] allow_write list admits "
                f"{', '.join(self.allow_write) or 'nothing'}"
            )


def parse(value: object, size: Any, seconds: Any) -> S3Config:
    """The `[s3]` table; `size` and `seconds` are config.py's parsers (one syntax for sizes)."""
    if not isinstance(value, dict):
        raise ValueError('write a table: [s3] with allow = ["s3://bucket/prefix/"]')
    fields = {f.name for f in dataclasses.fields(S3Config)}
    if unknown := sorted(set(value) - fields):
        raise ValueError(f"unknown key {unknown[0]}; the keys are {', '.join(sorted(fields))}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key in ("allow", "allow_write"):
            out[key] = tuple(_prefix(p) for p in (v if isinstance(v, list) else [None]))
        elif key in ("endpoint_url", "region"):
            if not isinstance(v, str) or (key == "endpoint_url" and v and
                                           not re.fullmatch(r"https?://[^\s/]+/?", v)):  # fmt: skip
                raise ValueError(f'{key}: write a string such as "https://s3.example.net:9000"')
            out[key] = v
        elif key == "cache_dir":
            if not isinstance(v, str) or (v and not os.path.isabs(v)):
                raise ValueError('cache_dir: write an absolute path: "/var/cache/thawd"')
            out[key] = v
        elif key in ("cache_bytes", "part_size"):
            out[key] = size(v)
        elif key == "timeout_s":
            out[key] = seconds(v)
        else:  # connections, max_attempts
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise ValueError(f"{key}: write a whole number from 1 to 64")
            out[key] = v
    config = S3Config(**out)
    if not (5 << 20) <= config.part_size <= (1 << 30):
        # S3's multipart parts are 5 MiB at least; 1 GiB bounds a request's memory.
        raise ValueError('part_size: write a size from "5MiB" to "1GiB"')
    if config.allow_write and not config.enabled:
        raise ValueError("allow_write needs allow: thawd reads back what it writes")
    if config.cache_dir and not config.cache_bytes:
        raise ValueError('cache_dir needs cache_bytes, the most it may hold: "200GiB"')
    return config


def _prefix(value: object) -> str:
    """An allow entry: an object URI prefix that ends at a bucket or a "directory" ("/"), so
    "s3://models/llama" cannot admit "s3://models/llama-private/..."."""
    if not isinstance(value, str) or not is_uri(value) or not value.endswith("/"):
        raise ValueError('allow: write a list of prefixes ending in "/": ["s3://bucket/models/"]')
    bucket = value.removeprefix(SCHEME).split("/", 1)[0]
    if not _BUCKET.fullmatch(bucket) or "/../" in value or "/./" in value:
        raise ValueError(f"allow: {value!r} does not name a bucket and prefix")
    return value
