"""The persistent registry: which snapshots exist, where, which file, which tier they want.

SQLite in the state directory, one row per snapshot. The daemon's memory is the truth while it
runs; the registry is how that truth survives a restart. So writes never stand in the way of
the memory they record:

- they run on one writer thread, in order: the event loop never waits on SQLite (a slow or
  full disk would otherwise stall every client of the daemon);
- a write that fails (disk full, read-only filesystem) stays queued and is retried every
  `RETRY_S` seconds, newest state per snapshot only: unpinning or unregistering works on a
  full disk, and the registry catches up once space returns. A daemon killed before then
  restarts with the last state that reached the disk.

Each batch of writes is one transaction: a daemon killed at any moment restarts with the
last committed state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("thawd.registry")

RETRY_S = 2.0

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
# Columns added after the first release: (name, definition). An older registry gains them at
# start; its rows have no identity yet and adopt the file found at their path (see Row.identity).
COLUMNS = (
    ("file_dev", "INTEGER NOT NULL DEFAULT -1"),
    ("file_ino", "INTEGER NOT NULL DEFAULT -1"),
    ("file_size", "INTEGER NOT NULL DEFAULT -1"),
    ("file_mtime_ns", "INTEGER NOT NULL DEFAULT -1"),
    ("file_ctime_ns", "INTEGER NOT NULL DEFAULT -1"),
    # 'ready', or 'writing' from a freeze's commit until its file is durable: a row still
    # 'writing' at start belonged to a daemon killed mid-write; its bytes died with it.
    ("state", "TEXT NOT NULL DEFAULT 'ready'"),
    # A snapshot in object storage (path s3://...): the ETag it was registered with, and its
    # manifest's content id, which a cached copy must match (thawd/s3/cache.py).
    ("object_etag", "TEXT NOT NULL DEFAULT ''"),
    ("content_id", "TEXT NOT NULL DEFAULT ''"),
)
FIELDS = (
    "name",
    "path",
    "labels",
    "wanted_tier",
    "checksum_state",
    "error",
    "owner_uid",
    "registered",
    "restores",
    "last_used",
    *(c for c, _ in COLUMNS),
)


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
    file_dev: int = -1
    file_ino: int = -1
    file_size: int = -1
    file_mtime_ns: int = -1
    file_ctime_ns: int = -1
    state: str = "ready"  # ready | writing
    object_etag: str = ""
    content_id: str = ""

    def values(self) -> tuple[object, ...]:
        return tuple(
            json.dumps(v) if f == "labels" else v
            for f, v in zip(FIELDS, dataclasses.astuple(self), strict=True)
        )


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last counters, never corrupt the file;
        # FULL costs an fsync (milliseconds) on every write.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(snapshots)")}
        for column, definition in COLUMNS:
            if column not in have:
                self._db.execute(f"ALTER TABLE snapshots ADD COLUMN {column} {definition}")
        # name -> the newest state to write (a Row, or None to delete), with its waiters.
        self._pending: dict[str, tuple[Row | None, list[concurrent.futures.Future[bool]]]] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._failing = ""  # the last write error, "" while writes succeed
        self._thread = threading.Thread(target=self._run, name="thawd-registry", daemon=True)
        self._thread.start()

    def rows(self) -> list[Row]:
        """Every row (at start, before any write is queued)."""
        cur = self._db.execute(f"SELECT {', '.join(FIELDS)} FROM snapshots ORDER BY registered")
        rows = []
        for r in cur:
            values = list(r)
            values[2] = json.loads(values[2])
            rows.append(Row(*values))
        return rows

    def save(self, row: Row) -> asyncio.Future[bool]:
        """Queue `row` (a copy of it now) for writing. The future is True once it is on disk,
        False if the first attempt failed (it stays queued and is retried): callers that
        acknowledge a change may await it; none needs to."""
        return self._queue(row.name, dataclasses.replace(row, labels=dict(row.labels)))

    def remove(self, name: str) -> asyncio.Future[bool]:
        return self._queue(name, None)

    @property
    def unsaved(self) -> int:
        """Snapshots whose newest state has not reached the disk yet."""
        with self._cond:
            return len(self._pending)

    @property
    def failing(self) -> str:
        return self._failing

    def _queue(self, name: str, row: Row | None) -> asyncio.Future[bool]:
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._cond:
            waiters = self._pending.pop(name, (None, []))[1]
            self._pending[name] = (row, [*waiters, future])
            self._cond.notify()
        return asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = dict(self._pending)
            try:
                self._write(batch)
            except sqlite3.Error as e:
                self._failed(batch, str(e))
                with self._cond:
                    if self._closing:
                        return  # close() says what is left
                    self._cond.wait(RETRY_S)  # close() wakes it for one last attempt
                continue
            if self._failing:
                log.warning("registry writable again: %d change(s) written", len(batch))
                self._failing = ""
            with self._cond:
                for name, (row, waiters) in batch.items():
                    if self._pending.get(name, (None, None))[0] is row:
                        del self._pending[name]
                    for w in waiters:
                        if not w.done():
                            w.set_result(True)

    def _write(
        self,
        batch: dict[str, tuple[Row | None, list[concurrent.futures.Future[bool]]]],
    ) -> None:
        placeholders = ", ".join("?" * len(FIELDS))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for name, (row, _) in batch.items():
                if row is None:
                    self._db.execute("DELETE FROM snapshots WHERE name=?", (name,))
                else:
                    self._db.execute(
                        f"INSERT OR REPLACE INTO snapshots ({', '.join(FIELDS)}) "
                        f"VALUES ({placeholders})",
                        row.values(),
                    )
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _failed(
        self, batch: dict[str, tuple[Row | None, list[concurrent.futures.Future[bool]]]], error: str
    ) -> None:
        if error != self._failing:  # one line per new error, not one per retry
            log.warning(
                "registry write failed (%s): %d change(s) kept in memory, retried every %.0f s",
                error,
                len(batch),
                RETRY_S,
            )
        self._failing = error
        for _, waiters in batch.values():
            for w in waiters:
                if not w.done():
                    w.set_result(False)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (one more attempt if writes fail), then close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._pending:
            log.error(
                "registry: %d change(s) could not be written before exit (%s)",
                len(self._pending),
                self._failing or "timeout",
            )
        self._db.close()


def new_row(name: str, path: str, labels: dict[str, str], owner_uid: int) -> Row:
    return Row(name, path, labels, "cold", "unverified", "", owner_uid, time.time())
