"""The persistent registry: which snapshots exist, where, and which tier they should be in.

SQLite in the state directory, one row per snapshot; each change is its own transaction, so a
daemon killed at any moment restarts with the last committed state. Live state (pool
buffers, sessions) is never stored here.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    wanted_tier TEXT NOT NULL DEFAULT 'cold',
    checksum_state TEXT NOT NULL DEFAULT 'unverified',
    error TEXT NOT NULL DEFAULT '',
    owner_uid INTEGER NOT NULL,
    registered REAL NOT NULL,
    restores INTEGER NOT NULL DEFAULT 0,
    last_used REAL NOT NULL DEFAULT 0
);
"""


@dataclasses.dataclass
class Row:
    name: str
    path: str
    labels: dict[str, str]
    wanted_tier: str  # cold | warm | pinned
    checksum_state: str  # unverified | verified | corrupt
    error: str
    owner_uid: int
    registered: float
    restores: int = 0
    last_used: float = 0.0


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last counters, never corrupt the file;
        # FULL costs an fsync (milliseconds) on every restore's bookkeeping.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def rows(self) -> list[Row]:
        cur = self._db.execute(
            "SELECT name, path, labels, wanted_tier, checksum_state, error, owner_uid, "
            "registered, restores, last_used FROM snapshots ORDER BY registered"
        )
        return [Row(r[0], r[1], json.loads(r[2]), *r[3:]) for r in cur]

    def add(self, row: Row) -> None:
        self._db.execute(
            "INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?,?)",
            (row.name, row.path, json.dumps(row.labels), row.wanted_tier, row.checksum_state,
             row.error, row.owner_uid, row.registered, row.restores, row.last_used),
        )  # fmt: skip

    def update(self, row: Row) -> None:
        self._db.execute(
            "UPDATE snapshots SET path=?, labels=?, wanted_tier=?, checksum_state=?, error=?, "
            "restores=?, last_used=? WHERE name=?",
            (row.path, json.dumps(row.labels), row.wanted_tier, row.checksum_state, row.error,
             row.restores, row.last_used, row.name),
        )  # fmt: skip

    def remove(self, name: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE name=?", (name,))

    def close(self) -> None:
        self._db.close()


def new_row(name: str, path: str, labels: dict[str, str], owner_uid: int) -> Row:
    return Row(name, path, labels, "cold", "unverified", "", owner_uid, time.time())
