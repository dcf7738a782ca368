"""Snapshots in object storage, against a real S3-protocol server on loopback (moto's
server mode) and a real thawd: what is pinned is bit-identical and verified, damaged or
replaced objects are refused, a lost server fails a pin in bounded time and leaves nothing
pinned, transient errors are retried, and thawd reads only what its operator allows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import Tensor

from tests.daemon.conftest import ThawdProcess, random_tensors, same, write_snapshot, zeros_like
from tests.engines.conftest import ROOT
from tests.s3.conftest import ALLOWED, BUCKET, upload
from tests.s3.store import CREDENTIALS, SECRET, MotoServer, Relay
from thaw import errors
from thaw.client import connect
from thaw.engines.options import Options
from thaw.engines.ranks import resolve
from thaw.engines.sources import find_source

Start = Callable[..., ThawdProcess]


def _snapshot(tmp: Path, seed: int = 1, scale: int = 300) -> tuple[Path, dict[str, Tensor]]:
    tensors = random_tensors(seed, scale=scale)  # scale 300: about 21 MiB, five 5 MiB ranges
    return write_snapshot(tmp / f"s{seed}.thaw", tensors), tensors


def test_pin_from_s3_is_bit_identical_and_cached_for_a_restart(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, tensors = _snapshot(tmp_path)
    uri = upload(moto, path, "llama.thaw")
    cache = tmp_path / "cache"
    daemon = s3_thawd(moto.url, log_level="debug", cache_dir=str(cache), cache_bytes="64MiB")
    with connect(daemon.socket) as c:
        record = c.register(uri)
        assert (record.name, record.path, record.tier) == ("llama", uri, "cold")
        with pytest.raises(errors.DaemonError, match="pin it first"):
            c.restore_tensors(zeros_like(tensors), "llama")  # objects serve from the pool only
        pinned = c.pin("llama")
        assert (pinned.tier, pinned.checksum_state) == ("pinned", "verified")
        # An engine given the URI finds the object thawd pinned (rank 0 of 1).
        source = find_source(resolve(Options(snapshot=uri), 0, 1), c)
        assert (source.name, source.tier) == ("llama", "pinned")
        out = zeros_like(tensors)
        c.restore_tensors(out, "llama")
        assert same(out, tensors)
    cached = list(cache.glob("*.thaw"))
    assert len(cached) == 1 and cached[0].read_bytes() == path.read_bytes()

    # A restart with the store unreachable re-pins from the node's cache (and checks it).
    daemon.stop()
    daemon.configure(s3={**daemon.settings["s3"], "endpoint_url": "http://127.0.0.1:9"})  # type: ignore[dict-item]
    daemon.start(env=CREDENTIALS)
    with connect(daemon.socket) as c:
        assert c.stat("llama").tier == "pinned"
        out = zeros_like(tensors)
        c.restore_tensors(out, "llama")
        assert same(out, tensors)
    assert SECRET not in daemon.log.read_text()  # not even at log_level = "debug"


def test_a_damaged_cache_file_is_never_served(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, tensors = _snapshot(tmp_path, seed=2)
    uri = upload(moto, path, "cached.thaw")
    cache = tmp_path / "cache"
    daemon = s3_thawd(moto.url, cache_dir=str(cache), cache_bytes="64MiB")
    with connect(daemon.socket) as c:
        c.register(uri)
        c.pin("cached")
    daemon.stop()
    (copy,) = cache.glob("*.thaw")
    with open(copy, "r+b") as f:  # one bit of the payload, metadata left as it was
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    daemon.start(env=CREDENTIALS)
    with connect(daemon.socket) as c:
        assert c.stat("cached").tier == "pinned"  # from the store, after the copy failed
        out = zeros_like(tensors)
        c.restore_tensors(out, "cached")
        assert same(out, tensors)
    assert "reading the store instead" in daemon.log.read_text()


def test_a_restart_re_pins_from_the_store_and_refuses_a_replaced_object(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, tensors = _snapshot(tmp_path, seed=12)
    other, _ = _snapshot(tmp_path, seed=13)
    uri = upload(moto, path, "restart.thaw")
    daemon = s3_thawd(moto.url)  # no cache: every pin reads the store
    with connect(daemon.socket) as c:
        c.register(uri)
        c.pin("restart")
    daemon.stop()
    daemon.start(env=CREDENTIALS)
    with connect(daemon.socket) as c:
        assert c.stat("restart").tier == "pinned"
        out = zeros_like(tensors)
        c.restore_tensors(out, "restart")
        assert same(out, tensors)
    upload(moto, other, "restart.thaw")  # another version under the registered key
    daemon.stop()
    daemon.start(env=CREDENTIALS)
    with connect(daemon.socket) as c:
        record = c.stat("restart")
        assert record.tier == "cold" and "replaced" in record.error


def test_a_corrupted_object_is_refused(moto: MotoServer, s3_thawd: Start, tmp_path: Path) -> None:
    path, _ = _snapshot(tmp_path, seed=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the payload: the header and manifest are intact
    uri = upload(moto, path, "corrupt.thaw", bytes(data))
    daemon = s3_thawd(moto.url)
    with connect(daemon.socket) as c:
        c.register(uri)
        with pytest.raises(errors.SnapshotCorrupt) as caught:
            c.pin("corrupt")
        assert caught.value.tensor
        record = c.stat("corrupt")
        assert (record.tier, record.checksum_state) == ("cold", "corrupt")
        assert c.status().pinned_used == 0


def test_a_truncated_object_is_refused(moto: MotoServer, s3_thawd: Start, tmp_path: Path) -> None:
    path, _ = _snapshot(tmp_path, seed=4)
    data = path.read_bytes()
    uri = upload(moto, path, "short.thaw", data[: len(data) - 4096])
    daemon = s3_thawd(moto.url)
    with connect(daemon.socket) as c, pytest.raises(errors.ThawError, match="truncated"):
        c.register(uri)


def test_an_object_replaced_after_register_is_refused(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, _ = _snapshot(tmp_path, seed=5)
    other, _ = _snapshot(tmp_path, seed=6)
    uri = upload(moto, path, "replaced.thaw")
    daemon = s3_thawd(moto.url)
    with connect(daemon.socket) as c:
        c.register(uri)
        upload(moto, other, "replaced.thaw")
        with pytest.raises(errors.SnapshotChanged, match="replaced"):
            c.pin("replaced")
        assert c.stat("replaced").tier == "cold"


def test_only_what_the_operator_allows_is_read(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, _ = _snapshot(tmp_path, seed=7, scale=1)
    moto.client().put_object(Bucket=BUCKET, Key="secrets/keys.thaw", Body=path.read_bytes())
    daemon = s3_thawd(moto.url)
    with connect(daemon.socket) as c:
        for uri in (f"s3://{BUCKET}/secrets/keys.thaw",
                    f"s3://{BUCKET}/snapshots/../secrets/keys.thaw",
                    "s3://another-bucket/snapshots/x.thaw"):  # fmt: skip
            with pytest.raises((errors.PermissionDenied, errors.InvalidRequest)):
                c.register(uri)
        with pytest.raises(errors.PermissionDenied, match="allow list admits only"):
            c.register(f"s3://{BUCKET}/secrets/keys.thaw")
    reader = s3_thawd(moto.url, allow_write=[])  # reads the store, never writes it
    with connect(reader.socket) as c, pytest.raises(errors.PermissionDenied, match="allow_write"):
        c.freeze_tensors(random_tensors(0), "upload", path=f"{ALLOWED}upload.thaw")
    off = s3_thawd(None)  # no [s3] table: object storage is off
    with connect(off.socket) as c, pytest.raises(errors.PermissionDenied, match="is off"):
        c.register(f"{ALLOWED}x.thaw")


def test_a_server_lost_mid_download_fails_clearly_and_pins_nothing(
    s3_thawd: Start, tmp_path: Path
) -> None:
    server = MotoServer()  # its own: this test kills it
    server.client().create_bucket(Bucket=BUCKET)
    relay = Relay(server.port, rate=2 << 20)  # 2 MB/s a connection: the pin takes seconds
    try:
        path, _ = _snapshot(tmp_path, seed=8)
        uri = upload(server, path, "lost.thaw")
        daemon = s3_thawd(relay.url)
        with connect(daemon.socket) as c:
            c.register(uri)
            failure: list[BaseException] = []

            def pin() -> None:
                try:
                    c.pin("lost")
                except BaseException as e:
                    failure.append(e)

            worker = threading.Thread(target=pin)
            worker.start()
            time.sleep(1.0)
            server.kill()
            t0 = time.monotonic()
            worker.join(60)
            assert not worker.is_alive()
            # Bounded: a few attempts of each range with backoff, not a hang.
            assert time.monotonic() - t0 < 30
            assert failure and isinstance(failure[0], errors.DaemonError), failure
            assert "lost.thaw" in str(failure[0]) and "attempts" in str(failure[0])
            record = c.stat("lost")
            assert record.tier == "cold"
            assert c.status().pinned_used == 0
    finally:
        relay.close()
        server.kill()


def test_transient_errors_are_retried_within_bounds(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    path, tensors = _snapshot(tmp_path, seed=9)
    uri = upload(moto, path, "flaky.thaw")
    flaky = Relay(moto.port, fail_first=2)  # the first two requests: 503 SlowDown
    down = Relay(moto.port, fail_first=10**6)  # every request: 503
    try:
        daemon = s3_thawd(flaky.url)
        with connect(daemon.socket) as c:
            c.register(uri)
            c.pin("flaky")
            out = zeros_like(tensors)
            c.restore_tensors(out, "flaky")
            assert same(out, tensors)
        assert flaky.connections > 2
        daemon = s3_thawd(down.url)
        expected = pytest.raises(errors.DaemonError, match="all of 3 attempts")
        with connect(daemon.socket) as c, expected:
            c.register(uri)
        assert down.connections == 3  # max_attempts = 3, then a clear error
    finally:
        flaky.close()
        down.close()


def test_freeze_to_s3_uploads_a_complete_verified_object(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    tensors = random_tensors(10, scale=300)
    daemon = s3_thawd(moto.url)
    uri = f"{ALLOWED}frozen/model.thaw"
    with connect(daemon.socket) as c:
        record = c.freeze_tensors(tensors, "frozen", path=uri, wait=True)
        assert (record.path, record.tier, record.checksum_state) == (uri, "pinned", "verified")
        with pytest.raises(errors.AlreadyExists):  # never over an existing object
            c.freeze_tensors(tensors, "again", path=uri, wait=True)
        with pytest.raises(errors.PermissionDenied):
            c.freeze_tensors(tensors, "elsewhere", path=f"s3://{BUCKET}/other/x.thaw")
    # The object is a whole snapshot file, in parts: what another node pins.
    head = moto.client().head_object(Bucket=BUCKET, Key="snapshots/frozen/model.thaw")
    assert head["ETag"].strip('"').endswith("-5")  # 5 MiB parts of about 21 MiB
    body = moto.client().get_object(Bucket=BUCKET, Key="snapshots/frozen/model.thaw")["Body"]
    (tmp_path / "model.thaw").write_bytes(body.read())
    from thaw.format import open_snapshot

    assert open_snapshot(tmp_path / "model.thaw").manifest.content_id == record.content_id
    other = s3_thawd(moto.url)
    with connect(other.socket) as c:
        c.register(uri)
        c.pin("model")
        out = zeros_like(tensors)
        c.restore_tensors(out, "model")
        assert same(out, tensors)
    assert not moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_thawctl_pins_inspects_and_freezes_objects(
    moto: MotoServer,
    s3_thawd: Start,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from thawctl.cli import main

    path, _ = _snapshot(tmp_path, seed=11, scale=1)
    uri = upload(moto, path, "cli.thaw")
    daemon = s3_thawd(moto.url)
    monkeypatch.setenv("THAW_SOCKET", daemon.socket)

    def thawctl(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(argv))
        return code, capsys.readouterr().out

    code, out = thawctl("pin", uri)
    assert code == 0 and "registered cli" in out and "cli is pinned" in out
    code, out = thawctl("info", uri)
    assert code == 0 and uri in out and "pinned" in out
    code, out = thawctl("pin", uri)  # already registered: found by its URI
    assert code == 0 and "registered" not in out
    frozen = f"{ALLOWED}cli-frozen.thaw"
    code, out = thawctl("freeze", "--model", "tiny", "-o", frozen)
    assert code == 0 and frozen in out
    code, out = thawctl("info", "cli-frozen", "--json")
    assert code == 0 and '"tier": "pinned"' in out
    code, _ = thawctl("pin", f"s3://{BUCKET}/secrets/x.thaw")
    assert code != 0


def test_a_cache_directory_others_may_write_stops_thawd_at_start(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RuntimeError, match="cache_dir"):
        s3_thawd(moto.url, cache_dir=str(shared), cache_bytes="1MiB")
    assert oct(shared.stat().st_mode & 0o777) == "0o777"  # refused, never chmodded


LOST = "s3://lost-bucket/"  # allowed to thawd, absent from the store


def test_an_upload_that_fails_leaves_the_error_on_the_snapshot(
    moto: MotoServer, s3_thawd: Start
) -> None:
    """A freeze's object is written behind it: when the store refuses the upload, the snapshot
    stays pinned in memory and says why its object does not exist, naming the bucket."""
    from thawctl.exitcodes import CommandError
    from thawctl.freeze import _written

    daemon = s3_thawd(moto.url, allow=[ALLOWED, LOST], allow_write=[ALLOWED, LOST])
    with connect(daemon.socket) as c:
        c.freeze_tensors(random_tensors(3, scale=50), "lost", path=f"{LOST}x.thaw")
        deadline = time.monotonic() + 60
        while not (record := c.stat("lost")).error and time.monotonic() < deadline:
            time.sleep(0.1)
        # What `thawctl freeze --engine vllm -o s3://...` waits on: the error, though the
        # record's file_bytes reads 0 as well.
        with pytest.raises(CommandError, match=f"thawd could not write {LOST}x.thaw: .*"
                           "no bucket 'lost-bucket'"):  # fmt: skip
            _written(c, "lost")
    assert "could not be written" in record.error and "no bucket 'lost-bucket'" in record.error
    assert record.tier == "pinned" and record.file_bytes == 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_thawctl_freezes_a_vllm_engine_into_an_object(
    moto: MotoServer, s3_thawd: Start, tmp_path: Path
) -> None:
    """`thawctl freeze --engine vllm -o s3://...`: the engine's weights go into thawd, which
    uploads them; the command returns once the object is complete, a whole verified snapshot
    that another thawd pins by its URI. An upload the store refuses fails the command with
    thawd's reason."""
    daemon = s3_thawd(moto.url, allow=[ALLOWED, LOST], allow_write=[ALLOWED, LOST])
    uri = f"{ALLOWED}vllm/tiny.thaw"

    def thawctl(*argv: str) -> subprocess.CompletedProcess[str]:
        # A fresh interpreter: vLLM spawns its engine processes, which need a __main__ guard.
        return subprocess.run([sys.executable, "-m", "thawctl", "--socket", daemon.socket, *argv],
                              capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip

    done = thawctl("freeze", "--engine", "vllm", "--model", "tiny", "-o", uri, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["fingerprint"]["engine"] == "vllm" and doc["fingerprint"]["dtype"] == "float32"
    assert [(f["path"], f["name"]) for f in doc["files"]] == [(uri, "tiny")]
    body = moto.client().get_object(Bucket=BUCKET, Key="snapshots/vllm/tiny.thaw")["Body"]
    (tmp_path / "tiny.thaw").write_bytes(body.read())
    verified = thawctl("verify", str(tmp_path / "tiny.thaw"))
    assert verified.returncode == 0, verified.stderr
    other = s3_thawd(moto.url)
    with connect(other.socket) as c:
        c.register(uri)
        assert c.pin("tiny").checksum_state == "verified"
    refused = thawctl("freeze", "--engine", "sglang", "--model", "tiny", "-o", uri)
    assert refused.returncode == 2 and "--engine torch or vllm" in refused.stderr
    lost = thawctl("freeze", "--engine", "vllm", "--model", "tiny", "-o", f"{LOST}tiny-2.thaw")
    # The object is written behind the freeze: thawd's reason reaches the command from the
    # worker's commit (a small model: written before it) or from its record afterwards.
    said = [line for line in lost.stderr.splitlines() if line.startswith("thawctl: error: ")]
    assert lost.returncode == 1 and len(said) == 1, lost.stderr[-3000:]
    assert f"{LOST}tiny-2.thaw" in said[0] and "no bucket 'lost-bucket'" in said[0], said
    assert "unexpected" not in said[0], said
