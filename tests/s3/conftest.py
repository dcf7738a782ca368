"""One moto server for the whole S3 suite (each start costs a second and an interpreter),
and thawds configured to read it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import ThawdProcess, make_dir
from tests.s3.store import CREDENTIALS, MotoServer

pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "thaw-models"
ALLOWED = f"s3://{BUCKET}/snapshots/"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.kill()


def s3_table(endpoint: str, **extra: object) -> dict[str, object]:
    # Small parts and few connections: a 20 MiB test object still takes several ranges.
    return {"allow": [ALLOWED], "allow_write": [ALLOWED], "endpoint_url": endpoint,
            "part_size": "5MiB",
            "connections": 4, "max_attempts": 3, "timeout_s": 5.0, **extra}  # fmt: skip


@pytest.fixture
def s3_thawd() -> Iterator[Callable[..., ThawdProcess]]:
    """Start thawds with an [s3] table (`s3_table`'s keys plus any given; none for an
    `endpoint` of None) and the tests' credentials in their environment; all closed after
    the test."""
    made: list[ThawdProcess] = []

    def start(endpoint: str | None, log_level: str = "info", **s3: object) -> ThawdProcess:
        table: dict[str, object] = {"s3": s3_table(endpoint, **s3)} if endpoint else {}
        daemon = ThawdProcess(make_dir(), log_level=log_level, **table)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon.start(env=CREDENTIALS)

    yield start
    for daemon in made:
        daemon.close()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def upload(server: MotoServer, path: Path, key: str, data: bytes | None = None) -> str:
    """Put the snapshot file at `path` (or `data`) as s3://BUCKET/snapshots/KEY; its URI."""
    body = path.read_bytes() if data is None else data
    server.client().put_object(Bucket=BUCKET, Key=f"snapshots/{key}", Body=body)
    return f"{ALLOWED}{key}"
