"""The snapshot header as docs/FORMAT.md specifies it, written out independently of
thaw.format, for the tests that read and damage snapshot files byte by byte."""

from __future__ import annotations

import struct

MiB = 1 << 20
HEADER = struct.Struct("<8sIIIIQQQQQQQ")
FIELDS = (
    "magic",
    "version",
    "flags",
    "header_size",
    "alignment",
    "payload_offset",
    "payload_length",
    "manifest_offset",
    "manifest_length",
    "file_length",
    "manifest_checksum",
    "header_checksum",
)
