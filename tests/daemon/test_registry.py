"""Register, list, stat, unregister; names validated; the registry survives a restart."""

from __future__ import annotations

import pytest

from tests.daemon.conftest import ThawdProcess, random_tensors, same, write_snapshot, zeros_like
from thaw import errors
from thaw.client import connect
from thaw.daemon.records import NA
from thaw.format.fingerprint import Fingerprint


def test_register_list_stat_unregister(module_thawd: ThawdProcess) -> None:
    thawd = module_thawd
    path = write_snapshot(thawd.dir / "a.thaw", random_tensors())
    with connect(thawd.socket) as c:
        rec = c.register(path, "model-a", labels={"team": "x"})
        assert (rec.name, rec.tier, rec.checksum_state, rec.tensor_count) == (
            "model-a",
            "cold",
            "unverified",
            4,
        )
        assert rec.last_used is NA and rec.labels == {"team": "x"}
        assert isinstance(rec.fingerprint, Fingerprint) and rec.fingerprint.model == "fixture"
        assert [s.name for s in c.list()] == ["model-a"]
        assert c.stat("model-a") == rec
        assert c.register(path).name == "a"  # default name: the file's stem
        with pytest.raises(errors.AlreadyExists):
            c.register(path, "model-a")
        for bad in ("-x", ".x", "a/b", "x" * 129, "a b"):
            with pytest.raises(errors.InvalidRequest):
                c.register(path, bad)
        with pytest.raises(errors.InvalidRequest):
            c.register(thawd.dir / "missing.thaw", "m")
        (thawd.dir / "junk.thaw").write_bytes(b"not a snapshot" * 400)
        with pytest.raises(errors.SnapshotCorrupt):
            c.register(thawd.dir / "junk.thaw", "junk")
        c.unregister("model-a")
        with pytest.raises(errors.NotFound):
            c.stat("model-a")


def test_registry_survives_restart_and_repins(thawd: ThawdProcess) -> None:
    tensors = random_tensors(1)
    path = write_snapshot(thawd.dir / "p.thaw", tensors)
    with connect(thawd.socket) as c:
        c.register(path, "p", labels={"k": "v"})
        c.pin("p")
        c.restore(zeros_like(tensors), "p")
        c.register(write_snapshot(thawd.dir / "q.thaw", random_tensors(2)), "q")
    thawd.restart()  # SIGTERM, then a new process on the same config and state dir
    with connect(thawd.socket) as c:
        p, q = c.stat("p"), c.stat("q")
        assert (p.tier, p.wanted_tier, p.restores, p.labels) == ("pinned", "pinned", 1, {"k": "v"})
        assert p.checksum_state == "verified"
        assert q.tier == "cold"
        out = zeros_like(tensors)
        assert c.restore(out, "p").tier == "pinned"
        assert same(out, tensors)
