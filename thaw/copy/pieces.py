"""Cutting a payload into pieces that fit one staging slot (checked piecewise with
thaw.format.checksum.Digests).

A piece is one contiguous, 4 KiB aligned range of the payload: one O_DIRECT read or write,
one slot of pinned staging. Small tensors share a piece (one syscall for many norms); a large
tensor is cut at multiples of the slot size, itself a multiple of the 16 MiB hash block, so
each piece hashes independently and the digests concatenate into the tensor's tree hash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from thaw import _native
from thaw.format import TensorEntry, align_up


@dataclasses.dataclass(frozen=True)
class Segment:
    """Bytes [tensor_offset, +length) of tensor `index`, at `piece_offset` within the piece."""

    index: int
    tensor_offset: int
    piece_offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class Piece:
    payload_offset: int
    length: int  # rounded up to 4 KiB: what is read or written
    segments: tuple[Segment, ...]


def plan(entries: Sequence[TensorEntry], slot_size: int) -> list[Piece]:
    """Pieces covering `entries` (in payload order), none longer than `slot_size`."""
    assert slot_size % _native.BLOCK_HASH_SIZE == 0
    pieces: list[Piece] = []
    start = 0
    segments: list[Segment] = []

    def flush(end: int) -> None:
        nonlocal segments
        if segments:
            pieces.append(Piece(start, align_up(end - start), tuple(segments)))
            segments = []

    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    end = 0
    for i in order:
        e = entries[i]
        # A piece is one contiguous run of these entries: never span bytes of tensors that are
        # not in `entries` (a freeze would overwrite them with this piece's gaps).
        if segments and (e.offset + e.length - start > slot_size or e.offset > align_up(end)):
            flush(end)
        if e.length > slot_size:
            for chunk in range(0, e.length, slot_size):
                start = e.offset + chunk
                n = min(slot_size, e.length - chunk)
                segments = [Segment(i, chunk, 0, n)]
                flush(start + n)
            continue
        if not segments:
            start = e.offset
        segments.append(Segment(i, 0, e.offset - start, e.length))
        end = e.offset + e.length
    flush(end)
    return pieces
