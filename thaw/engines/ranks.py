"""Where each tensor-parallel rank's snapshot lives: one snapshot per rank, named from the
one the caller gave (docs/ENGINES.md, "Ranks").

All rank naming is here. Three spellings name snapshots that already exist on disk and in
thawd registries, so they stay as they are: an engine's snapshot files insert ".rank{N}"
before the suffix (`rank_path`), its thawd names append "-rank{N}" (`rank_name`), and a KV
prefix's shards other than rank 0 append ".tp{N}" (`kv_rank_name`). "{rank}" in a name or
path given by the caller replaces all three. A path may be an object's URI
(s3://bucket/key.thaw, which thawd pins): its ranks are named as files' are.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from thaw.engines.options import Options


def is_path(snapshot: str) -> bool:
    """A file path rather than a thawd name: it has a directory part or the .thaw suffix."""
    return os.sep in snapshot or snapshot.endswith(".thaw") or snapshot.startswith("~")


def rank_path(template: str, rank: int, tp_size: int) -> str:
    """The file of one rank: "{rank}" is replaced; without it, TP>1 inserts ".rank{N}" before
    the suffix (model.thaw -> model.rank1.thaw) and TP=1 uses the path as is."""
    template = os.path.expanduser(template)
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    if tp_size == 1:
        return template
    # The last component by string, not Path: Path("s3://b/k") would lose a slash.
    head, slash, base = template.rpartition("/")
    suffix = Path(base).suffix or ""
    return f"{head}{slash}{base[: len(base) - len(suffix)]}.rank{rank}{suffix}"


def rank_name(name: str, rank: int, tp_size: int) -> str:
    """The thawd name of one rank: "{rank}" is replaced; without it, TP>1 appends -rank{N}."""
    if "{rank}" in name:
        return name.replace("{rank}", str(rank))
    return name if tp_size == 1 else f"{name}-rank{rank}"


def kv_rank_name(name: str, rank: int) -> str:
    """The thawd name of one rank's shard of KV prefix `name`: rank 0 keeps the name (a
    prefix is looked up by it), other ranks store theirs beside it."""
    return name if rank == 0 else f"{name}.tp{rank}"


@dataclasses.dataclass(frozen=True)
class RankRef:
    """Where one rank's snapshot lives: a thawd name, a file, or both ("" = none)."""

    name: str
    path: str

    @property
    def label(self) -> str:
        return self.name or self.path


def resolve(options: Options, rank: int, tp_size: int) -> RankRef:
    """Rank `rank`'s snapshot of an engine of `tp_size` ranks loading `options.snapshot`."""
    if is_path(options.snapshot):
        return RankRef("", absolute(rank_path(options.snapshot, rank, tp_size)))
    path = rank_path(options.path, rank, tp_size) if options.path else ""
    return RankRef(rank_name(options.snapshot, rank, tp_size), absolute(path) if path else "")


def absolute(path: str) -> str:
    """A file's absolute path; an object's URI as it is (thawd matches it by its URI)."""
    return path if path.startswith("s3://") else os.path.abspath(path)
