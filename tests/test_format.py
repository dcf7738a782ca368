"""Snapshot format v1 in detail: layout, header fields, file mode, manifest and fingerprint."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.format_spec import FIELDS, HEADER, MiB
from thaw import _native, freeze_file, open_snapshot, restore_file
from thaw.errors import ThawError
from thaw.format import (
    ALIGNMENT,
    HEADER_SIZE,
    MAGIC,
    PAYLOAD_OFFSET,
    VERSION,
    SnapshotWriter,
    align_up,
    layout,
)
from thaw.format.fingerprint import Fingerprint


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        return dict(zip(FIELDS, HEADER.unpack(f.read(HEADER.size)), strict=True))


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_constants() -> None:
    assert MAGIC == b"THAWSNAP" and VERSION == 1
    assert HEADER_SIZE == 4096 and ALIGNMENT == 4096
    assert PAYLOAD_OFFSET == 2 << 20  # a huge-page boundary


def test_layout_aligns_every_tensor() -> None:
    specs = [
        ("a", "float32", (3, 5)),  # 60 bytes
        ("empty", "float16", (0, 7)),  # 0 bytes
        ("b", "bfloat16", (4096,)),  # exactly 2 pages
        ("s", "int64", ()),  # a scalar
        ("c", "uint8", (4097,)),
        ("d", "complex128", (2,)),
    ]
    entries = layout(specs)
    assert [(e.name, e.dtype, e.shape) for e in entries] == specs
    assert [e.length for e in entries] == [60, 0, 8192, 8, 4097, 32]
    assert [e.offset for e in entries] == [0, 4096, 4096, 12288, 16384, 24576]
    end = 0
    for e in entries:
        assert e.offset % ALIGNMENT == 0
        assert e.offset >= end
        end = e.offset + e.length
    assert align_up(0) == 0 and align_up(1) == 4096 and align_up(4096) == 4096


def test_header_fields(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    h = read_header(path)
    size = os.path.getsize(path)
    assert h["magic"] == MAGIC
    assert h["version"] == 1
    assert h["flags"] == 0
    assert h["header_size"] == 4096
    assert h["alignment"] == 4096
    assert h["payload_offset"] == 2 * MiB
    assert h["payload_length"] % 4096 == 0
    assert h["manifest_offset"] == h["payload_offset"] + h["payload_length"]
    assert h["manifest_offset"] % 4096 == 0
    assert h["manifest_offset"] + h["manifest_length"] == h["file_length"] == size
    raw = path.read_bytes()
    manifest = raw[h["manifest_offset"] :]
    assert h["manifest_checksum"] == _native.xxh3(manifest)
    assert h["header_checksum"] == _native.xxh3(raw[: HEADER.size - 8])
    # Everything between the header struct and the payload is zero.
    assert raw[HEADER.size : h["payload_offset"]] == bytes(h["payload_offset"] - HEADER.size)


def test_payload_starts_at_2_mib(small_snapshot: Any) -> None:
    path, source = small_snapshot
    raw = path.read_bytes()
    snapshot = open_snapshot(path)
    assert snapshot.payload_offset == 2 * MiB
    end = 0
    for entry in snapshot.tensors:
        start = 2 * MiB + entry.offset
        assert raw[start : start + entry.length] == tensor_bytes(source[entry.name]), entry.name
        # Padding between tensors is zero, so the payload depends on the tensors only.
        assert raw[2 * MiB + end : start] == bytes(start - 2 * MiB - end)
        end = entry.offset + entry.length
    assert snapshot.payload_length == align_up(end)


def test_manifest_content(small_snapshot: Any) -> None:
    path, source = small_snapshot
    h = read_header(path)
    doc = json.loads(path.read_bytes()[h["manifest_offset"] :])
    assert doc["format"] == "thaw-snapshot"
    assert doc["checksum_algorithm"] == "xxh3-tree-16M"
    assert Fingerprint.from_json(doc["fingerprint"]).parameter_count == sum(
        t.numel() for t in source.values()
    )
    assert [t["name"] for t in doc["tensors"]] == list(source)
    for t in doc["tensors"]:
        src = source[t["name"]]
        assert t["dtype"] == str(src.dtype).removeprefix("torch.")
        assert t["shape"] == list(src.shape)
        assert t["length"] == src.numel() * src.element_size()
        data = src.contiguous()
        assert t["checksum"] == f"{_native.tree_hash(data.data_ptr(), t['length']):016x}"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_file_mode_follows_umask(tmp_path: Path, umask: Any) -> None:
    old = os.umask(umask)
    try:
        freeze_file({"w": torch.ones(3)}, tmp_path / "m.thaw")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "m.thaw").st_mode)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("source", [{}, [], torch.nn.ReLU()], ids=["dict", "list", "module"])
def test_empty_model_round_trips(tmp_path: Path, source: Any) -> None:
    path = tmp_path / "empty.thaw"
    freeze_file(source, path)
    snapshot = open_snapshot(path)
    assert snapshot.tensors == ()
    assert snapshot.payload_length == 0
    h = read_header(path)
    assert h["payload_length"] == 0 and h["manifest_offset"] == 2 * MiB
    stats = restore_file(source, path)
    assert stats.bytes == 0


def test_unicode_names(tmp_path: Path) -> None:
    names = ["模型.层.0.weight", "naïve·norm", "emoji🙂.bias", 'quote"back\\slash', "new\nline"]
    names.append("x" * 1024)  # the longest name the reader accepts
    source = {name: torch.full((i + 1,), float(i)) for i, name in enumerate(names)}
    freeze_file(source, tmp_path / "u.thaw")
    snapshot = open_snapshot(tmp_path / "u.thaw")
    assert [t.name for t in snapshot.tensors] == names
    assert snapshot.tensor("emoji🙂.bias").shape == (3,)
    target = {name: torch.zeros(i + 1) for i, name in enumerate(names)}
    restore_file(target, tmp_path / "u.thaw")
    for name in names:
        assert torch.equal(target[name], source[name]), name


def test_fingerprint_is_stored(tmp_path: Path) -> None:
    fp = Fingerprint(
        architecture="LlamaForCausalLM",
        dtype="bfloat16",
        parameter_count=3,
        quantization="fp8",
        tp_rank=3,
        tp_size=8,
        engine="sglang",
        engine_version="0.5.23",
        model="meta-llama/x",
        labels={"owner": "ops", "ünï": "cödé"},
    )
    freeze_file({"w": torch.ones(3)}, tmp_path / "f.thaw", fingerprint=fp)
    assert open_snapshot(tmp_path / "f.thaw").fingerprint == fp


def test_default_fingerprint_describes_module(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    freeze_file(model, tmp_path / "m.thaw")
    fp = open_snapshot(tmp_path / "m.thaw").fingerprint
    assert (fp.architecture, fp.dtype, fp.parameter_count) == ("Linear", "bfloat16", 10)


texts = st.text(max_size=20)


@settings(max_examples=50, deadline=None)
@given(
    fp=st.builds(
        Fingerprint,
        architecture=texts,
        dtype=texts,
        parameter_count=st.integers(-1, 2**63),
        quantization=texts,
        tp_rank=st.integers(0, 1024),
        tp_size=st.integers(1, 1024),
        engine=texts,
        engine_version=texts,
        model=texts,
        labels=st.dictionaries(texts, texts, max_size=4),
    )
)
def test_fingerprint_json_round_trip(fp: Any) -> None:
    assert Fingerprint.from_json(json.loads(json.dumps(fp.to_json()))) == fp


def test_fingerprint_from_empty_json_is_default() -> None:
    assert Fingerprint.from_json({}) == Fingerprint()


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        ({"colour": "red"}, "unknown fingerprint keys ['colour']"),
        ({"tp_rank": "0"}, "tp_rank must be int"),
        ({"tp_size": True}, "tp_size must be int"),
        ({"parameter_count": 1.5}, "parameter_count must be int"),
        ({"parameter_count": None}, "parameter_count must be int"),
        ({"architecture": 5}, "architecture must be str"),
        ({"engine": ["vllm"]}, "engine must be str"),
        ({"labels": ["a"]}, "labels must map strings to strings"),
        ({"labels": {"a": 1}}, "labels must map strings to strings"),
        ({"labels": None}, "labels must map strings to strings"),
    ],
)
def test_fingerprint_from_json_rejects(data: Any, phrase: Any) -> None:
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        Fingerprint.from_json(data)


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.thaw"
    path.write_bytes(b"previous content")
    entries = layout([("w", "float32", (1024,))])
    data = torch.arange(1024, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="boom"), SnapshotWriter(path, entries) as writer:
        writer.write_at(0, data.data_ptr(), 4096)
        raise RuntimeError("boom")
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.thaw"]


def test_freeze_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "r.thaw"
    freeze_file({"a": torch.ones(2)}, path)
    old_inode = os.stat(path).st_ino
    freeze_file({"b": torch.zeros(3)}, path)
    assert os.stat(path).st_ino != old_inode  # a new file renamed over, never rewritten in place
    assert [t.name for t in open_snapshot(path).tensors] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.thaw"]


def test_source_with_a_non_tensor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'n' is a int"):
        freeze_file({"w": torch.ones(2), "n": 3}, tmp_path / "x.thaw")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "source",
    [
        {"x" * 1025: torch.ones(1)},
        {"": torch.ones(1)},
        {"w": torch.ones([1] * 17)},
    ],
    ids=["name-over-1024", "empty-name", "17-dims"],
)
def test_freeze_writes_only_what_the_reader_accepts(tmp_path: Path, source: Any) -> None:
    """A snapshot freeze_file writes must open; what the reader would refuse, freeze refuses."""
    path = tmp_path / "x.thaw"
    try:
        freeze_file(source, path)
    except (ValueError, ThawError):
        assert list(tmp_path.iterdir()) == []
        return
    open_snapshot(path)
