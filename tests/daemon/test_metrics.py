"""The Prometheus endpoint of a real thawd, scraped after real work, against the docs' table."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import ROOT, ThawdProcess, random_tensors, write_snapshot, zeros_like
from thaw import errors
from thaw.client import connect
from thaw.format import open_snapshot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict]:
    """Samples by (name, sorted labels), and families by name with their type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples, families = {}, {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def corrupt_copy(directory, tensors: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    path = write_snapshot(directory / "bad.thaw", tensors)
    snap = open_snapshot(path)
    with open(path, "r+b") as f:
        f.seek(snap.payload_offset + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


@pytest.fixture
def scraped(thawd_factory: object) -> tuple[dict, dict, tuple[int, int], object]:
    port = free_port()
    daemon: ThawdProcess = thawd_factory(metrics_port=port)  # type: ignore[operator]
    tensors = random_tensors(1)
    path = write_snapshot(daemon.dir / "s.thaw", tensors)
    sizes = (sum(t.nbytes for t in tensors.values()), open_snapshot(path).payload_length)
    with connect(daemon.socket) as c:
        c.register(path, "s")
        c.pin("s")
        for _ in range(3):
            c.restore(zeros_like(tensors), "s")
        c.register(corrupt_copy(daemon.dir, random_tensors(2)), "bad")
        with pytest.raises(errors.SnapshotCorrupt):
            c.pin("bad")
        c.freeze(random_tensors(4), "frozen", pin=False, wait=True)
        samples, families = scrape(port)
        status = c.status()
    assert "scrape without the daemon's state" not in daemon.log.read_text()
    return samples, families, sizes, status


def test_metrics_after_register_pin_restore_and_a_corrupt_pin(scraped) -> None:  # type: ignore[no-untyped-def]
    samples, _, (tensor_bytes, payload), status = scraped
    assert value(samples, "thawd_build_info", version="0.1.0", api_version=str(
        status.api_version), pool="memfd") == 1  # fmt: skip
    assert value(samples, "thawd_budget_bytes", tier="pinned") == 256 << 20
    assert value(samples, "thawd_used_bytes", tier="pinned") == status.pinned_used > 0
    assert value(samples, "thawd_sessions_open", kind="restore") == 0
    assert value(samples, "thawd_snapshot_bytes", snapshot="s", tier="pinned") == payload
    assert value(samples, "thawd_snapshot_bytes", snapshot="bad", tier="cold") == payload
    assert value(samples, "thawd_snapshot_restores_total", snapshot="s") == 3
    # "frozen" (pin=False) stays in the pool until a budget needs the room.
    assert value(samples, "thawd_snapshots", tier="pinned") == 2
    assert value(samples, "thawd_snapshots", tier="cold") == 1
    assert value(samples, "thawd_restores_total", outcome="ok") == 3
    assert value(samples, "thawd_restores_total", outcome="failed") == 0
    assert value(samples, "thawd_restored_bytes_total") == 3 * tensor_bytes
    assert value(samples, "thawd_restore_seconds_count") == 3
    assert value(samples, "thawd_pin_seconds_count", tier="pinned") == 1
    assert value(samples, "thawd_checksum_errors_total", during="pin") == 1
    assert value(samples, "thawd_failures_total", event="pin_failed") == 1
    assert value(samples, "thawd_freeze_seconds_count", stage="commit") == 1
    assert value(samples, "thawd_freeze_seconds_count", stage="write") == 1
    assert value(samples, "thawd_events_total", event="registered") == 2


def test_every_family_is_documented_and_every_documented_one_exists(scraped) -> None:  # type: ignore[no-untyped-def]
    _, families, _, _ = scraped
    exposed = {name + ("_total" if kind == "counter" else "")
               for name, kind in families.items() if name.startswith("thawd_")}  # fmt: skip
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    table = text[text.index("## Metrics") :].split("\n## ")[0]
    documented = set(re.findall(r"^\| `(thawd_[a-z_]+)` \|", table, re.M))
    assert exposed == documented
    daemon_md = (ROOT / "docs" / "DAEMON.md").read_text()
    for name in re.findall(r"`(thawd_[a-z_]+)`", daemon_md):
        assert name in documented, f"docs/DAEMON.md names {name}, which thawd does not expose"
