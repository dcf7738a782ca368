"""The snapshot format: what a snapshot is at rest (docs/FORMAT.md).

`snapshot` is the one reader and the one writer of snapshot files; `dtypes` names the tensor
types a manifest may hold; `fingerprint` says what model a snapshot was frozen from. Nothing
here imports torch at module level or knows about thawd: every other layer reads and writes
snapshots through this one.
"""

from thaw.format.checksum import Digests, checksum, file_checksums, verify_tensor
from thaw.format.fingerprint import Fingerprint
from thaw.format.snapshot import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    HEADER_SIZE,
    MAGIC,
    MAX_MANIFEST_BYTES,
    MAX_NAME,
    MAX_NDIM,
    MAX_TENSORS,
    PAYLOAD_OFFSET,
    TEMP_SUFFIX,
    VERSION,
    Manifest,
    Snapshot,
    SnapshotWriter,
    TensorEntry,
    align_up,
    layout,
    open_snapshot,
    parse_manifest,
    payload_fd,
    read_snapshot,
)

__all__ = [
    "ALIGNMENT",
    "CHECKSUM_ALGORITHM",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME",
    "MAX_NDIM",
    "MAX_TENSORS",
    "PAYLOAD_OFFSET",
    "TEMP_SUFFIX",
    "VERSION",
    "Digests",
    "Fingerprint",
    "Manifest",
    "Snapshot",
    "SnapshotWriter",
    "TensorEntry",
    "align_up",
    "checksum",
    "file_checksums",
    "layout",
    "open_snapshot",
    "parse_manifest",
    "payload_fd",
    "read_snapshot",
    "verify_tensor",
]
