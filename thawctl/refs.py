"""NAME|PATH arguments: which ones name a file, and which an object (s3://bucket/key)."""

from __future__ import annotations

import os


def looks_like_path(ref: str) -> bool:
    """A NAME|PATH argument names a file if it has a slash, ends in .thaw, or exists.

    Snapshot names cannot contain "/" (thawd validates them), so a slash is unambiguous;
    `./name` reaches a file that shares a snapshot's name.
    """
    return "/" in ref or ref.endswith(".thaw") or os.path.exists(ref)


def is_object(ref: str) -> bool:
    """An object in S3-compatible storage, which thawd reads itself (docs/FLEET.md)."""
    return ref.startswith("s3://")
