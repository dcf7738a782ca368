"""Reading a snapshot object's payload into a pool buffer: parallel ranged GETs, each
tensor verified against the manifest as soon as all its bytes are in.

The payload goes in groups of tensors (`groups`, about 1 GiB each, as a pin from a file);
within a group, ranges of `part_size` run on `connections` threads straight into the
buffer, so there is never a second copy of the payload. A group's tensors are hashed as soon
as its ranges are in (in native code, on `threads` threads) before its progress is reported:
the buffer holds only verified bytes when the last group is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from thaw.format import TensorEntry
from thaw.format.checksum import verify_tensor
from thawd.s3.objects import SnapshotObject
from thawd.s3.store import Store

Progress = Callable[[int], None]


def fill(store: Store, obj: SnapshotObject, addr: int, groups: Sequence[Sequence[TensorEntry]],
         threads: int, progress: Progress) -> None:  # fmt: skip
    """Read and verify every tensor of `groups` into the payload buffer at `addr`, calling
    `progress(end)` with each group's payload end once it is verified."""
    c = store.config
    base = obj.snapshot.payload_offset

    def get(r: tuple[int, int]) -> None:
        store.read_into(obj.ref, obj.etag, base + r[0], r[1], addr + r[0])

    pool = ThreadPoolExecutor(c.connections, thread_name_prefix="thawd-s3-get")
    try:
        for group in groups:
            start, end = group[0].offset, group[-1].offset + group[-1].length
            ranges = [(o, min(c.part_size, end - o)) for o in range(start, end, c.part_size)]
            list(pool.map(get, ranges))  # the first failed range raises here
            for t in group:
                verify_tensor(obj.ref.uri, t, addr + t.offset, threads)
            progress(end)
    finally:
        # After a failure: ranges not started are dropped, those running are waited for
        # (the caller frees the buffer they write only once this returns).
        pool.shutdown(wait=True, cancel_futures=True)
